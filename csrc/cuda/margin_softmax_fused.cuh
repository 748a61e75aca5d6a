// Per-row and per-class kernels around the fused margin-softmax GEMMs (backend "cutlass_sm90";
// the GEMMs: csrc/cuda_sm90/margin_softmax_sm90.cuh; the math: csrc/include/oclear/fused_margin.h).
// Plain CUDA on raw pointers, compiled for every architecture; bfloat16 operands, float32 statistics,
// float64 where fused_margin.h says so. Nothing here allocates, synchronises or uses atomics: each output
// element has one writer, and every sum runs in a fixed order.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include <oclear/fused_margin.h>
#include <oclear/margin.h>

namespace oclear::cuda {

// Per row i whose label y (not ignore_index) is in this shard's classes [class_start, class_start + classes):
//   cos_t = clamp((x^_i . w_{y - class_start}) * w_inv[y - class_start]),  z_t = s * psi(cos_t) (float64),
//   target_logit[i] = z_t, target_cos[i] = cos_t, target_exp[i] = exp(z_t - s);
// other rows (label elsewhere or ignore_index): 0, 0, 0. One warp per row, fixed reduction order.
bool launch_fused_target(const void* x_hat, const void* w, const float* w_inv, const int64_t* labels, int64_t n,
                         int64_t d, int64_t class_start, int64_t classes, int64_t ignore_index,
                         const MarginParams<double>& margin,
                         float* target_logit, float* target_cos, double* target_exp, cudaStream_t stream);

// lse[i] = s + log(sum_t partial[t * m_pad + i] + target_exp[i]) (merged in tile order, float64), and
// true_max[i] = needs_true_max(that total, classes). One thread per row.
bool launch_fused_finalize(const float* partial, int64_t m_pad, int64_t tiles, const double* target_exp, int64_t n,
                           int64_t classes, double scale, float* lse, int32_t* true_max, cudaStream_t stream);

// Rows flagged by launch_fused_finalize: lse[i] recomputed with a true max over every class of the shard
// (the negatives' logits from x^_i . w_c on CUDA cores, the target's logit from target_logit), so the
// fixed shift's underflow never reaches the loss. One block per row; unflagged rows return at once.
// O(flagged rows x classes x d) work: a rare path, see fused_margin.h's needs_true_max.
bool launch_fused_true_max(const int32_t* true_max, const void* x_hat, const void* w, const float* w_inv,
                           const int64_t* labels, int64_t n, int64_t d, int64_t class_start, int64_t classes,
                           int64_t ignore_index, const MarginParams<double>& margin, const float* target_logit,
                           float* lse, cudaStream_t stream);

// Per-row inputs of the recompute epilogue: lse2 = lse * log2(e), gs = grad_lse * s, and
// gt = target_grad(target_cos, grad_lse, grad_target, lse) for rows whose label is in the shard
// (label_col >= 0), else 0; with row_scale not null (store-E mode), also stored_row_scale there and
// lost_row = stored_row_lost(lse, s, classes) (classes: the shard's).
bool launch_fused_row_grads(const float* target_cos, const float* label_col, const float* grad_lse,
                            const float* grad_target, const float* lse, int64_t n, int64_t classes,
                            const MarginParams<double>& margin, float* lse2, float* gs, float* gt, float* row_scale,
                            int32_t* lost_row, cudaStream_t stream);

// Store-E backward, one chunk of t classes from c0 (w_inv and w: the chunk's): b[i * ld_b + c] =
// bf16(stored_grad(stored[i * ld_stored + c0 + c], row_scale[i], c0 + c == label_col[i], gt[i], w_inv[c])), or,
// on a row with lost_row set, bf16(recompute_grad(x^_i . w_c, w_inv[c], ..., lse2[i], gs[i], gt[i], shift)) from
// the logits recomputed on CUDA cores (x^: n x d, w: t x d, bf16 rows). With stored null (row_scale and lost_row
// then unread), every row recomputes: the recompute mode's last classes, fewer than 8, that its GEMMs cannot take.
bool launch_fused_stored_grad(const void* stored, int64_t ld_stored, int64_t c0, int64_t t, int64_t n,
                              const float* row_scale, const float* label_col, const float* gt, const float* w_inv,
                              const int32_t* lost_row, const void* x_hat, const void* w, int64_t d,
                              const float* lse2, const float* gs, const fused::ShiftParams& shift, void* b,
                              int64_t ld_b, cudaStream_t stream);

// Store-E forward, the shard's last `tail` classes from c_tail (fewer than 8: TMA needs the GEMM's class count to
// be a multiple of 8), on CUDA cores: stored[i * ld_stored + c] = bf16(stored_exp(shifted_exp(x^_i . w_c, ...)))
// and partial_tile[i] = (accumulate ? partial_tile[i] : 0) + the row's sum of those shifted_exp, in class order
// (partial_tile: the column of partials of the class tile holding these classes; w, w_inv, label columns: the
// shard's).
bool launch_fused_store_tail(const void* x_hat, const void* w, const float* w_inv, const float* label_col, int64_t n,
                             int64_t d, int64_t c_tail, int64_t tail, const fused::ShiftParams& shift,
                             float* partial_tile, bool accumulate, void* stored, int64_t ld_stored,
                             cudaStream_t stream);

// Per class c of a chunk: r = sum_m r_partial[m * t_pad + c] over the row tiles in order (float64), then
// beta[c] = projection_coefficient(r, w_inv[c]). One thread per class.
bool launch_fused_projection(const float* r_partial, int64_t row_tiles, int64_t t_pad, const float* w_inv, int64_t t,
                             float* beta, cudaStream_t stream);

}  // namespace oclear::cuda

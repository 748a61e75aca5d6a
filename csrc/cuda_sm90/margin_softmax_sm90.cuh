// Launch interface of the fused margin-softmax GEMMs for Hopper (backend "cutlass_sm90"): CUTLASS 3
// warp-specialised TMA / wgmma GEMMs whose epilogues consume the logits in registers, so no N x C score
// matrix is ever written (csrc/cuda_sm90/margin_softmax_sm90.cu). Raw pointers, sizes and a stream: the
// torch glue (csrc/ops/margin_softmax_cuda.cpp) allocates every buffer. The per-element math is
// csrc/include/oclear/fused_margin.h; the per-row and per-class kernels around these GEMMs are in
// csrc/cuda/margin_softmax_fused.cuh. The algorithm: docs/cuda.md ("The fused kernels for Hopper").
//
// Operands: x^ (n x d, row-major, bfloat16, rows normalised), w (classes x d, row-major, bfloat16, raw
// rows), d a multiple of 8 and every pointer 16-byte aligned (TMA). Class ids and label columns are
// float32 (exact below 2^24 classes per shard; the glue checks it).
//
// Every launcher returns 0 on success, or a CUTLASS status code (can_implement / initialize / run)
// as 100 * stage + status; launchers of a build without the sm_90a kernels return -1.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace oclear::sm90 {

// CTA tile of the two logit GEMMs (forward and backward recompute use the same one, so their logits are
// bit-identical): rows x classes. The partial-sum layouts below are in these units.
constexpr int64_t kTileRows = 128;
constexpr int64_t kTileClasses = 256;

// True when this build holds the sm_90a kernels (setup.py compiles this file only with 9.0a in
// TORCH_CUDA_ARCH_LIST; plain 9.0 would build CUTLASS's arch-guarded kernels as empty functions).
bool kernels_built();

// Whether the GEMMs accept the calls the glue makes for n rows, a shard of `classes` classes and d features, as
// CUTLASS's can_implement judges them (the extents and strides of every TMA operand): "" when all five do, else
// the name of the first that refuses. The forward and class-max GEMMs take every class; the store-E forward and
// the backward GEMMs the first classes - classes % 8 (the glue sends the rest to CUDA-core kernels), asked at a
// whole-tile chunk and at the last chunk. Host code, no device needed, so CI's gate runs it
// (csrc/tests/gate_sm90_shapes.cu). A build without the kernels answers "all".
const char* refusing_gemm(int64_t n, int64_t classes, int64_t d);

struct ShiftArgs {  // oclear::fused::ShiftParams, repeated so this header needs no other
  float k;
  float filtered;
  bool has_filter;
  float filter;
};

// Forward: partial[t * round_up(n, kTileRows) + i] = sum over the classes c of tile t of
// shifted_exp(x^_i . w_c, w_inv[c], class_id[c] == label_col[i]); tiles = ceil(classes / kTileClasses).
size_t forward_workspace_size(int64_t n, int64_t classes, int64_t d);
int launch_forward(int64_t n, int64_t classes, int64_t d, const void* x_hat, const void* w, const float* w_inv,
                   const float* class_id, const float* label_col, const ShiftArgs& shift, float* partial,
                   void* workspace, cudaStream_t stream);

// Forward of the store-E mode: as launch_forward, and also stored[i * ld_stored + c] = bf16(stored_exp(...))
// (0 on the target column and on filtered negatives). ld_stored a multiple of 8.
size_t forward_store_workspace_size(int64_t n, int64_t classes, int64_t d);
int launch_forward_store(int64_t n, int64_t classes, int64_t d, const void* x_hat, const void* w, const float* w_inv,
                         const float* class_id, const float* label_col, const ShiftArgs& shift, float* partial,
                         void* stored, int64_t ld_stored, void* workspace, cudaStream_t stream);

// Backward recompute of one chunk of t classes: ds[i * ld_ds + c] = bf16(recompute_grad(...)) and
// r_partial[m * round_up(t, kTileClasses) + c] = sum over the rows i of row tile m of
// projection_term(ds[i, c], x^_i . w_c). ld_ds a multiple of 8.
size_t recompute_workspace_size(int64_t n, int64_t t, int64_t d);
int launch_recompute(int64_t n, int64_t t, int64_t d, const void* x_hat, const void* w, const float* w_inv,
                     const float* class_id, const float* label_col, const float* lse2, const float* gs,
                     const float* gt, const ShiftArgs& shift, void* ds, int64_t ld_ds, float* r_partial,
                     void* workspace, cudaStream_t stream);

// hardest_classes scoring: partial[m * round_up(classes, kTileClasses) + c] = max over the rows i of row tile m
// of x^_i . w_c (NaN skipped; -inf where none).
size_t class_max_workspace_size(int64_t n, int64_t classes, int64_t d);
int launch_class_max(int64_t n, int64_t classes, int64_t d, const void* x_hat, const void* w, float* partial,
                     void* workspace, cudaStream_t stream);

// dW of one chunk with the normalisation's projection in the epilogue:
//   grad_w[c, :] = bf16(sum_i ds[i, c] x^_i + beta[c] * w[c, :])   (t x d, row-major)
size_t weight_grad_workspace_size(int64_t t, int64_t n, int64_t d);
int launch_weight_grad(int64_t t, int64_t n, int64_t d, const void* ds, int64_t ld_ds, const void* x_hat,
                       const void* w, const float* beta, void* grad_w, void* workspace, cudaStream_t stream);

}  // namespace oclear::sm90

// CUDA epilogue kernels of the fused margin softmax: the launch interface the torch glue calls
// (csrc/ops/margin_softmax_cuda.cpp). Framework-free: raw pointers, sizes, strides (in elements)
// and a cudaStream_t, so margin_softmax.cu compiles with plain nvcc (CMake compile gate) and this
// header with any host compiler that sees the CUDA runtime headers.
//
// The algorithm (see margin_softmax_cuda.cpp): classes in chunks of T; per chunk the glue runs the
// GEMM S = x^ W_chunk^T (raw, unnormalised weight rows) through ATen / cuBLAS into a float32 (or
// float64) buffer, then one of these epilogues turns S into row statistics (forward) or into
// B = dLoss/dcos * w_inv (backward) for the two gradient GEMMs. cos = S * w_inv: no normalised
// copy of the weight ever exists.
//
// Index arithmetic is 64-bit throughout (N x C passes 2^31 at C = 4M, N = 1024).
// Every launcher returns false, launching nothing, when it does not handle the dtype combination
// (the glue turns that into an error); n == 0 or t == 0 launches nothing and returns true.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include <oclear/margin.h>

namespace oclear::cuda {

enum class Dtype : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// The accumulation dtype of an input dtype: float64 for float64, else float32.
inline Dtype accumulation_dtype(Dtype t) { return t == Dtype::kFloat64 ? Dtype::kFloat64 : Dtype::kFloat32; }

// inv[r] = 1 / max(|x_r|, 1e-12) for the rows of x (rows x cols, strides s0, s1, dtype `dtype`),
// in the accumulation dtype. When x_hat is not null, also writes x^_r = x_r * inv[r] there,
// contiguous, in `dtype` (the GEMM operand). One warp per row.
bool launch_normalize_rows(const void* x, Dtype dtype, int64_t rows, int64_t cols, int64_t s0,
                           int64_t s1, void* x_hat, void* inv, cudaStream_t stream);

// Forward epilogue of one chunk: S (n x t, contiguous, accumulation dtype `acc`) holds raw dot
// products x^_i . w_c of the classes [class0, class0 + t); w_inv their inverse norms. Per row it
// forms the logits (margin on the target, filtering on negatives), reduces them to an online-
// softmax state and merges it into (row_max, row_sum) (first chunk: overwrites them). The chunk
// that holds row i's label writes target[i] = its logit; the first chunk writes 0 for the others.
// When lse is not null (last chunk) it also writes lse[i] = row_max + log(row_sum).
// One block per row; S is only read.
bool launch_forward_epilogue(Dtype acc, const void* s, int64_t n, int64_t t, const void* w_inv,
                             const int64_t* labels, int64_t class0, int64_t ignore_index,
                             const MarginParams<double>& margin, void* row_max, void* row_sum,
                             void* target, void* lse, bool first_chunk, cudaStream_t stream);

// Backward epilogue of one chunk: from S (as above) writes
//   b[i, c] = (grad_lse_i * softmax_ic + grad_target_i * [c == y_i]) * dz/dcos * w_inv_c
// with softmax_ic = exp(z_ic - lse_i), in dtype `out` (contiguous n x t; may alias s when
// out == acc: every element is read and then written by the same thread). Rows with
// grad_lse = grad_target = 0 (ignored rows) get zeros. float16 output saturates at +-65504
// instead of overflowing to inf (reachable only where dLoss/dcos * w_inv itself exceeds the
// float16 range, e.g. the floored exact ArcFace derivative at cos = +-1).
bool launch_backward_epilogue(Dtype acc, Dtype out, const void* s, void* b, int64_t n, int64_t t,
                              const void* w_inv, const int64_t* labels, int64_t class0,
                              int64_t ignore_index, const MarginParams<double>& margin,
                              const void* lse, const void* grad_lse, const void* grad_target,
                              cudaStream_t stream);

// dW for one chunk, through the normalisation w^ = w / |w|:
//   grad_w[c] = E[c] - w_c * w_inv_c^2 * (w_c . E[c])   (E[c] alone where |w_c| <= 1e-12)
// E (t x d, contiguous, accumulation dtype) = B^T x^; w (t x d, strides s0, s1, dtype `dtype`);
// grad_w contiguous t x d in `dtype`. One warp per class.
bool launch_project_weight_grad(Dtype dtype, const void* e, const void* w, int64_t t, int64_t d,
                                int64_t s0, int64_t s1, const void* w_inv, void* grad_w,
                                cudaStream_t stream);

// dx from g = dLoss/dx^ (n x d, contiguous, accumulation dtype):
//   grad_x[i] = (g_i - x^_i (x^_i . g_i)) * x_inv_i   (g_i * x_inv_i where |x_i| <= 1e-12)
// x (n x d, strides s0, s1, dtype `dtype`), grad_x contiguous in `dtype`. One warp per row.
bool launch_embedding_grad(Dtype dtype, const void* g, const void* x, int64_t n, int64_t d,
                           int64_t s0, int64_t s1, const void* x_inv, void* grad_x,
                           cudaStream_t stream);

// first_bad (one int64, set to n beforehand) becomes the smallest i whose label is neither
// ignore_index nor in [0, num_classes), or stays n. No host synchronisation here.
bool launch_find_bad_label(const int64_t* labels, int64_t n, int64_t num_classes,
                           int64_t ignore_index, int64_t* first_bad, cudaStream_t stream);

}  // namespace oclear::cuda

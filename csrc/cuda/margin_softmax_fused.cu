// Per-row and per-class kernels of the fused margin softmax (contracts: margin_softmax_fused.cuh).
#include "margin_softmax_fused.cuh"

#include <cuda_bf16.h>

#include <oclear/fused_margin.h>
#include <oclear/margin.h>
#include <oclear/margin_epilogue.h>
#include <oclear/online_softmax.h>

namespace oclear::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

int blocks_for(int64_t items, int64_t per_block) {
  const int64_t b = (items + per_block - 1) / per_block;
  return static_cast<int>(b < kMaxBlocks ? b : kMaxBlocks);
}

// x . w over d bfloat16 elements by one warp, lanes strided, then a butterfly: the same order every call.
__device__ float warp_dot(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, int64_t d,
                          int lane) {
  float acc = 0.f;
  for (int64_t k = lane; k < d; k += kWarp) acc = fmaf(__bfloat162float(x[k]), __bfloat162float(w[k]), acc);
  for (int offset = kWarp / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  return acc;
}

// x . w over d bfloat16 elements by one thread, in order: the CUDA-core logits of the rare and tail paths.
__device__ float thread_dot(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, int64_t d) {
  float acc = 0.f;
  for (int64_t k = 0; k < d; ++k) acc = fmaf(__bfloat162float(x[k]), __bfloat162float(w[k]), acc);
  return acc;
}

// The row's label as a column of this shard, or -1 (another shard's class, or ignore_index).
__device__ int64_t local_label(const int64_t* labels, int64_t i, int64_t class_start, int64_t classes,
                               int64_t ignore_index) {
  if (labels[i] == ignore_index) return -1;
  const int64_t y = labels[i] - class_start;
  return (y >= 0 && y < classes) ? y : -1;
}

__global__ void __launch_bounds__(kThreads) target_kernel(const __nv_bfloat16* __restrict__ x_hat,
                                                          const __nv_bfloat16* __restrict__ w,
                                                          const float* __restrict__ w_inv,
                                                          const int64_t* __restrict__ labels, int64_t n, int64_t d,
                                                          int64_t class_start, int64_t classes, int64_t ignore_index,
                                                          MarginParams<double> margin, float* __restrict__ target_logit,
                                                          float* __restrict__ target_cos,
                                                          double* __restrict__ target_exp) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / kWarp; i < n; i += int64_t(gridDim.x) * kWarps) {
    const int64_t y = local_label(labels, i, class_start, classes, ignore_index);
    if (y < 0) {
      if (lane == 0) target_logit[i] = 0.f, target_cos[i] = 0.f, target_exp[i] = 0.0;
      continue;
    }
    const float raw = warp_dot(x_hat + i * d, w + y * d, d, lane);
    if (lane == 0) {
      const double c = clamp_unit(static_cast<double>(raw * w_inv[y]));
      const fused::TargetTerms t = fused::target_terms(c, margin);
      target_logit[i] = static_cast<float>(t.logit);
      target_cos[i] = static_cast<float>(c);
      target_exp[i] = t.shifted_exp;
    }
  }
}

__global__ void __launch_bounds__(kThreads) finalize_kernel(const float* __restrict__ partial, int64_t m_pad,
                                                            int64_t tiles, const double* __restrict__ target_exp,
                                                            int64_t n, int64_t classes, double scale,
                                                            float* __restrict__ lse, int32_t* __restrict__ true_max) {
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    // Threads of a warp read consecutive rows of one tile: coalesced.
    const double total = fused::merge_partials(partial + i, tiles, m_pad) + target_exp[i];
    lse[i] = static_cast<float>(fused::shifted_lse(total, scale));
    true_max[i] = fused::needs_true_max(total, classes) ? 1 : 0;
  }
}

__global__ void __launch_bounds__(kThreads) true_max_kernel(const int32_t* __restrict__ true_max,
                                                            const __nv_bfloat16* __restrict__ x_hat,
                                                            const __nv_bfloat16* __restrict__ w,
                                                            const float* __restrict__ w_inv,
                                                            const int64_t* __restrict__ labels, int64_t n, int64_t d,
                                                            int64_t class_start, int64_t classes,
                                                            int64_t ignore_index, MarginParams<double> margin,
                                                            const float* __restrict__ target_logit,
                                                            float* __restrict__ lse) {
  __shared__ float warp_max[kWarps];
  __shared__ float warp_sum[kWarps];
  const MarginParams<float> pf = margin.cast<float>();
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    if (!true_max[i]) continue;  // uniform across the block
    const int64_t y = local_label(labels, i, class_start, classes, ignore_index);
    SoftmaxState<float> state = SoftmaxState<float>::empty();
    for (int64_t c = warp; c < classes; c += kWarps) {
      const float raw = warp_dot(x_hat + i * d, w + c * d, d, lane);
      if (c != y) state.push(epilogue_logit(raw, w_inv[c], false, pf, margin));
    }
    if (lane == 0) warp_max[warp] = state.max, warp_sum[warp] = state.sum;
    __syncthreads();
    if (threadIdx.x == 0) {
      SoftmaxState<double> row = SoftmaxState<double>::empty();
      for (int k = 0; k < kWarps; ++k) row.merge(warp_max[k], warp_sum[k]);  // fixed warp order
      if (y >= 0) row.push(static_cast<double>(target_logit[i]));
      lse[i] = static_cast<float>(row.log_sum_exp());
    }
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kThreads) row_grads_kernel(const float* __restrict__ target_cos,
                                                             const float* __restrict__ label_col,
                                                             const float* __restrict__ grad_lse,
                                                             const float* __restrict__ grad_target,
                                                             const float* __restrict__ lse, int64_t n, int64_t classes,
                                                             MarginParams<double> margin, float* __restrict__ lse2,
                                                             float* __restrict__ gs, float* __restrict__ gt,
                                                             float* __restrict__ row_scale,
                                                             int32_t* __restrict__ lost_row) {
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    lse2[i] = static_cast<float>(static_cast<double>(lse[i]) * fused::kLog2e);
    gs[i] = static_cast<float>(static_cast<double>(grad_lse[i]) * margin.scale);
    if (row_scale != nullptr) {
      row_scale[i] = fused::stored_row_scale(grad_lse[i], lse[i], margin.scale);
      lost_row[i] = fused::stored_row_lost(lse[i], margin.scale, classes) ? 1 : 0;
    }
    gt[i] = label_col[i] >= 0.f ? static_cast<float>(fused::target_grad(target_cos[i], grad_lse[i], grad_target[i],
                                                                        lse[i], margin))
                                : 0.f;
  }
}

// One thread per element of the chunk; threads of a block run along the classes of one row (coalesced). A row
// whose E' the flush lost (lost_row, uniform across the block), or every row when stored is null (recompute
// mode's last classes, fewer than 8, that its GEMMs cannot take), recomputes its logits instead, one dot
// product per thread: correct rather than fast, for a rare row or a handful of classes.
__global__ void __launch_bounds__(kThreads) stored_grad_kernel(const __nv_bfloat16* __restrict__ stored,
                                                               int64_t ld_stored, int64_t c0, int64_t t, int64_t n,
                                                               const float* __restrict__ row_scale,
                                                               const float* __restrict__ label_col,
                                                               const float* __restrict__ gt,
                                                               const float* __restrict__ w_inv,
                                                               const int32_t* __restrict__ lost_row,
                                                               const __nv_bfloat16* __restrict__ x_hat,
                                                               const __nv_bfloat16* __restrict__ w, int64_t d,
                                                               const float* __restrict__ lse2,
                                                               const float* __restrict__ gs, fused::ShiftParams shift,
                                                               __nv_bfloat16* __restrict__ b, int64_t ld_b) {
  for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
    const bool recompute = stored == nullptr || lost_row[i] != 0;
    const float a = recompute ? 0.f : row_scale[i], g = gt[i], y = label_col[i];
    for (int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x; c < t; c += int64_t(gridDim.x) * kThreads) {
      const bool is_target = static_cast<float>(c0 + c) == y;
      const float grad =
          recompute
              ? fused::recompute_grad(thread_dot(x_hat + i * d, w + c * d, d), w_inv[c], is_target, lse2[i], gs[i], g,
                                      shift)
              : fused::stored_grad(__bfloat162float(stored[i * ld_stored + c0 + c]), a, is_target, g, w_inv[c]);
      b[i * ld_b + c] = __float2bfloat16_rn(grad);
    }
  }
}

// Store-E forward, the shard's last `tail` (< 8) classes from c_tail, which its GEMM cannot take: one thread per
// row, classes in order, writes their E' and adds the sum of their shifted_exp to the row's partial of the
// class tile they fall in (partial_tile: that tile's column of partials), onto the GEMM's partial when the
// GEMM covered part of the tile (accumulate), else as the tile's only term.
__global__ void __launch_bounds__(kThreads) store_tail_kernel(const __nv_bfloat16* __restrict__ x_hat,
                                                              const __nv_bfloat16* __restrict__ w,
                                                              const float* __restrict__ w_inv,
                                                              const float* __restrict__ label_col, int64_t n, int64_t d,
                                                              int64_t c_tail, int64_t tail, fused::ShiftParams shift,
                                                              float* __restrict__ partial_tile, bool accumulate,
                                                              __nv_bfloat16* __restrict__ stored, int64_t ld_stored) {
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    float sum = 0.f;
    for (int64_t c = c_tail; c < c_tail + tail; ++c) {
      const float raw = thread_dot(x_hat + i * d, w + c * d, d);
      const float e = fused::shifted_exp(raw, w_inv[c], static_cast<float>(c) == label_col[i], shift);
      stored[i * ld_stored + c] = __float2bfloat16_rn(fused::stored_exp(e, raw, w_inv[c], shift));
      sum += e;
    }
    partial_tile[i] = (accumulate ? partial_tile[i] : 0.f) + sum;
  }
}

__global__ void __launch_bounds__(kThreads) projection_kernel(const float* __restrict__ r_partial, int64_t row_tiles,
                                                              int64_t t_pad, const float* __restrict__ w_inv,
                                                              int64_t t, float* __restrict__ beta) {
  for (int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x; c < t; c += int64_t(gridDim.x) * kThreads) {
    beta[c] = fused::projection_coefficient(fused::merge_partials(r_partial + c, row_tiles, t_pad), w_inv[c]);
  }
}

}  // namespace

#ifndef OCLEAR_CUDA_EMULATION  // the CPU emulation test (csrc/tests/cuda_emulation) launches the kernels itself
namespace {
bool launched() { return cudaGetLastError() == cudaSuccess; }
}  // namespace

bool launch_fused_target(const void* x_hat, const void* w, const float* w_inv, const int64_t* labels, int64_t n,
                         int64_t d, int64_t class_start, int64_t classes, int64_t ignore_index,
                         const MarginParams<double>& margin,
                         float* target_logit, float* target_cos, double* target_exp, cudaStream_t stream) {
  if (n == 0) return true;
  target_kernel<<<blocks_for(n, kWarps), kThreads, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(x_hat), static_cast<const __nv_bfloat16*>(w), w_inv, labels, n, d,
      class_start, classes, ignore_index, margin, target_logit, target_cos, target_exp);
  return launched();
}

bool launch_fused_finalize(const float* partial, int64_t m_pad, int64_t tiles, const double* target_exp, int64_t n,
                           int64_t classes, double scale, float* lse, int32_t* true_max, cudaStream_t stream) {
  if (n == 0) return true;
  finalize_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(partial, m_pad, tiles, target_exp, n, classes,
                                                                     scale, lse, true_max);
  return launched();
}

bool launch_fused_true_max(const int32_t* true_max, const void* x_hat, const void* w, const float* w_inv,
                           const int64_t* labels, int64_t n, int64_t d, int64_t class_start, int64_t classes,
                           int64_t ignore_index, const MarginParams<double>& margin, const float* target_logit,
                           float* lse, cudaStream_t stream) {
  if (n == 0) return true;
  true_max_kernel<<<blocks_for(n, 1), kThreads, 0, stream>>>(
      true_max, static_cast<const __nv_bfloat16*>(x_hat), static_cast<const __nv_bfloat16*>(w), w_inv, labels, n, d,
      class_start, classes, ignore_index, margin, target_logit, lse);
  return launched();
}

bool launch_fused_row_grads(const float* target_cos, const float* label_col, const float* grad_lse,
                            const float* grad_target, const float* lse, int64_t n, int64_t classes,
                            const MarginParams<double>& margin, float* lse2, float* gs, float* gt, float* row_scale,
                            int32_t* lost_row, cudaStream_t stream) {
  if (n == 0) return true;
  row_grads_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(target_cos, label_col, grad_lse, grad_target,
                                                                      lse, n, classes, margin, lse2, gs, gt, row_scale,
                                                                      lost_row);
  return launched();
}

bool launch_fused_stored_grad(const void* stored, int64_t ld_stored, int64_t c0, int64_t t, int64_t n,
                              const float* row_scale, const float* label_col, const float* gt, const float* w_inv,
                              const int32_t* lost_row, const void* x_hat, const void* w, int64_t d,
                              const float* lse2, const float* gs, const fused::ShiftParams& shift, void* b,
                              int64_t ld_b, cudaStream_t stream) {
  if (n == 0 || t == 0) return true;
  const dim3 grid(static_cast<unsigned>(blocks_for(t, kThreads)), static_cast<unsigned>(n < 65535 ? n : 65535));
  stored_grad_kernel<<<grid, kThreads, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(stored), ld_stored, c0, t, n, row_scale, label_col, gt, w_inv, lost_row,
      static_cast<const __nv_bfloat16*>(x_hat), static_cast<const __nv_bfloat16*>(w), d, lse2, gs, shift,
      static_cast<__nv_bfloat16*>(b), ld_b);
  return launched();
}

bool launch_fused_store_tail(const void* x_hat, const void* w, const float* w_inv, const float* label_col, int64_t n,
                             int64_t d, int64_t c_tail, int64_t tail, const fused::ShiftParams& shift,
                             float* partial_tile, bool accumulate, void* stored, int64_t ld_stored,
                             cudaStream_t stream) {
  if (n == 0 || tail == 0) return true;
  store_tail_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(x_hat), static_cast<const __nv_bfloat16*>(w), w_inv, label_col, n, d, c_tail,
      tail, shift, partial_tile, accumulate, static_cast<__nv_bfloat16*>(stored), ld_stored);
  return launched();
}

bool launch_fused_projection(const float* r_partial, int64_t row_tiles, int64_t t_pad, const float* w_inv, int64_t t,
                             float* beta, cudaStream_t stream) {
  if (t == 0) return true;
  projection_kernel<<<blocks_for(t, kThreads), kThreads, 0, stream>>>(r_partial, row_tiles, t_pad, w_inv, t, beta);
  return launched();
}

#endif  // OCLEAR_CUDA_EMULATION

}  // namespace oclear::cuda

// CUDA epilogue kernels of the fused margin softmax (interface and contracts: margin_softmax.cuh).
//
// Numerics: the margin transform, its derivative, the negative-logit rule and the online-softmax
// state come from csrc/include/oclear (the same code the CPU kernels run). Statistics are kept in
// the accumulation dtype (float32 for 16-bit and float32 inputs, float64 for float64). The target
// logit and its gradient (one element per row and chunk) are evaluated in float64 whatever the
// input dtype, so nvcc's --use_fast_math (approximate cosf / sinf / acosf) never touches the margin.
//
// Layout: the epilogues run one block per row (rows of S are contiguous, so the threads of a block
// read consecutive addresses); the per-row normalisation and projection kernels run one warp per
// row of D elements. Nothing here allocates, synchronises or reads back.
#include "margin_softmax.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <oclear/margin.h>
#include <oclear/margin_epilogue.h>
#include <oclear/online_softmax.h>

#include <type_traits>

namespace oclear::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = kThreads / kWarp;
// Row loops are grid-strided; this bounds the grid (far above what fills any GPU).
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<storage type>) for a storage dtype; false if unknown.
template <typename F>
bool dispatch_storage(Dtype t, F&& f) {
  switch (t) {
    case Dtype::kFloat32: f(Tag<float>{}); return true;
    case Dtype::kFloat64: f(Tag<double>{}); return true;
    case Dtype::kBFloat16: f(Tag<__nv_bfloat16>{}); return true;
    case Dtype::kFloat16: f(Tag<__half>{}); return true;
  }
  return false;
}

// Calls f(Tag<accumulation type>) for float32 / float64; false otherwise.
template <typename F>
bool dispatch_acc(Dtype t, F&& f) {
  switch (t) {
    case Dtype::kFloat32: f(Tag<float>{}); return true;
    case Dtype::kFloat64: f(Tag<double>{}); return true;
    default: return false;
  }
}

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Explicit conversions (torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends).
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(v));
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

// A GEMM operand: like from_acc, but float16 saturates at its largest finite value (+-65504)
// instead of becoming inf, which would turn whole rows of the next GEMM into inf / NaN.
template <typename T, typename A>
__device__ __forceinline__ T to_gemm_operand(A v) {
  if constexpr (std::is_same_v<T, __half>) {
    const float f = static_cast<float>(v);
    return __float2half_rn(f > 65504.0f ? 65504.0f : (f < -65504.0f ? -65504.0f : f));
  } else {
    return from_acc<T>(v);
  }
}

// 1 / max(sqrt(ss), eps) as the CPU computes it (a correctly rounded sqrt, then a correctly rounded
// reciprocal), whatever --use_fast_math does to sqrtf and '/': an inverse norm one ulp off turns
// x^ . w^ = 1 into 0.99999994, which acos (hence ArcFace) magnifies to 3e-4 radians. Each fast
// approximation gets one Newton step with an exact FMA residual (Markstein), which rounds correctly
// in practice; the IEEE intrinsics (__fsqrt_rn, __frcp_rn) would too, but their slow-path calls make
// ptxas spill registers.
__device__ __forceinline__ float inverse_norm(float ss) {
  float norm = sqrtf(ss);
  if (norm > 0.0f && norm < 3.0e38f) norm = fmaf(fmaf(-norm, norm, ss), 0.5f / norm, norm);
  const float eps = static_cast<float>(kNormEps);
  norm = norm < eps ? eps : norm;  // a NaN norm stays NaN (as the CPU's std::max keeps it)
  const float r = 1.0f / norm;
  return norm < 3.0e38f ? fmaf(r, fmaf(-norm, r, 1.0f), r) : r;
}
__device__ __forceinline__ double inverse_norm(double ss) {
  const double norm = sqrt(ss);
  return 1.0 / (norm < kNormEps ? kNormEps : norm);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ SoftmaxState<T> warp_merge(SoftmaxState<T> s) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const T other_max = __shfl_xor_sync(0xffffffffu, s.max, offset);
    const T other_sum = __shfl_xor_sync(0xffffffffu, s.sum, offset);
    s.merge(other_max, other_sum);
  }
  return s;
}

// The state of the whole block, valid in thread 0. Ends with a barrier, so `scratch` can be
// reused right after.
template <typename T>
__device__ __forceinline__ SoftmaxState<T> block_merge(SoftmaxState<T> s, T* scratch_max, T* scratch_sum) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  s = warp_merge(s);
  if (lane == 0) {
    scratch_max[warp] = s.max;
    scratch_sum[warp] = s.sum;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / kWarp;
    s = lane < warps ? SoftmaxState<T>{scratch_max[lane], scratch_sum[lane]} : SoftmaxState<T>::empty();
    s = warp_merge(s);
  }
  __syncthreads();
  return s;
}

// Column of row i's target within the chunk, or -1.
__device__ __forceinline__ int64_t target_column(int64_t label, int64_t ignore_index, int64_t class0, int64_t t) {
  if (label == ignore_index) return -1;
  const int64_t col = label - class0;
  return (col >= 0 && col < t) ? col : -1;
}

inline unsigned int row_blocks(int64_t rows) {
  return static_cast<unsigned int>(rows < kMaxBlocks ? rows : kMaxBlocks);
}

inline unsigned int warp_row_blocks(int64_t rows) {
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<unsigned int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// ------------------------------------------------------------------------------------------------
// Kernels
// ------------------------------------------------------------------------------------------------

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) normalize_rows_kernel(const scalar_t* __restrict__ x, int64_t rows,
                                                                  int64_t cols, int64_t s0, int64_t s1,
                                                                  scalar_t* __restrict__ x_hat,
                                                                  acc_of<scalar_t>* __restrict__ inv) {
  using acc_t = acc_of<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  for (int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; r < rows;
       r += int64_t(gridDim.x) * kWarpsPerBlock) {
    const scalar_t* row = x + r * s0;
    acc_t ss = 0;
#pragma unroll 4
    for (int64_t k = lane; k < cols; k += kWarp) {
      const acc_t v = to_acc(row[k * s1]);
      ss += v * v;
    }
    ss = warp_sum(ss);
    const acc_t r_inv = inverse_norm(ss);
    if (lane == 0) inv[r] = r_inv;
    if (x_hat != nullptr) {
      scalar_t* out = x_hat + r * cols;
#pragma unroll 4
      for (int64_t k = lane; k < cols; k += kWarp) out[k] = from_acc<scalar_t>(to_acc(row[k * s1]) * r_inv);
    }
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) forward_epilogue_kernel(
    const acc_t* __restrict__ s, int64_t n, int64_t t, const acc_t* __restrict__ w_inv,
    const int64_t* __restrict__ labels, int64_t class0, int64_t ignore_index, MarginParams<double> margin,
    acc_t* __restrict__ row_max, acc_t* __restrict__ row_sum, acc_t* __restrict__ target,
    acc_t* __restrict__ lse, bool first_chunk) {
  __shared__ acc_t scratch_max[kWarp];
  __shared__ acc_t scratch_sum[kWarp];
  const MarginParams<acc_t> p = margin.cast<acc_t>();
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const acc_t* row = s + i * t;
    const int64_t tc = target_column(labels[i], ignore_index, class0, t);
    SoftmaxState<acc_t> state = SoftmaxState<acc_t>::empty();
#pragma unroll 4
    for (int64_t c = threadIdx.x; c < t; c += blockDim.x) {
      const acc_t z = epilogue_logit(row[c], w_inv[c], c == tc, p, margin);
      if (c == tc) target[i] = z;
      state.push(z);
    }
    state = block_merge(state, scratch_max, scratch_sum);
    if (threadIdx.x == 0) {
      SoftmaxState<acc_t> total = first_chunk ? SoftmaxState<acc_t>::empty() : SoftmaxState<acc_t>{row_max[i], row_sum[i]};
      total.merge(state);
      row_max[i] = total.max;
      row_sum[i] = total.sum;
      if (first_chunk && tc < 0) target[i] = acc_t(0);
      if (lse != nullptr) lse[i] = total.log_sum_exp();
    }
  }
}

template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kThreads) backward_epilogue_kernel(
    const acc_t* s, out_t* b, int64_t n, int64_t t, const acc_t* __restrict__ w_inv,
    const int64_t* __restrict__ labels, int64_t class0, int64_t ignore_index, MarginParams<double> margin,
    const acc_t* __restrict__ lse, const acc_t* __restrict__ grad_lse, const acc_t* __restrict__ grad_target) {
  // s and b may alias (float32 / float64): no __restrict__ on them; each element is read, then
  // written, by the same thread.
  const MarginParams<acc_t> p = margin.cast<acc_t>();
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const acc_t* row = s + i * t;
    out_t* out = b + i * t;
    const int64_t tc = target_column(labels[i], ignore_index, class0, t);
    const acc_t g = grad_lse[i];
    const acc_t g_target = tc >= 0 ? grad_target[i] : acc_t(0);
    if (g == acc_t(0) && g_target == acc_t(0)) {  // ignored rows: nothing flows back
      for (int64_t c = threadIdx.x; c < t; c += blockDim.x) out[c] = from_acc<out_t>(acc_t(0));
      continue;
    }
    const acc_t row_lse = lse[i];
#pragma unroll 4
    for (int64_t c = threadIdx.x; c < t; c += blockDim.x) {
      out[c] = to_gemm_operand<out_t>(epilogue_grad(row[c], w_inv[c], c == tc, g, g_target, row_lse, p, margin));
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) project_weight_grad_kernel(
    const acc_of<scalar_t>* __restrict__ e, const scalar_t* __restrict__ w, int64_t t, int64_t d, int64_t s0,
    int64_t s1, const acc_of<scalar_t>* __restrict__ w_inv, scalar_t* __restrict__ grad_w) {
  using acc_t = acc_of<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  for (int64_t c = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; c < t;
       c += int64_t(gridDim.x) * kWarpsPerBlock) {
    const acc_t* er = e + c * d;
    const scalar_t* wr = w + c * s0;
    acc_t dot = 0;
    for (int64_t k = lane; k < d; k += kWarp) dot += to_acc(wr[k * s1]) * er[k];
    dot = warp_sum(dot);
    const acc_t wi = w_inv[c];
    // |w| <= eps: w^ = w / eps is linear in w, no projection (what F.normalize's autograd does).
    const acc_t coef = wi * acc_t(kNormEps) < acc_t(1) ? wi * wi * dot : acc_t(0);
    scalar_t* out = grad_w + c * d;
    for (int64_t k = lane; k < d; k += kWarp) out[k] = from_acc<scalar_t>(er[k] - to_acc(wr[k * s1]) * coef);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) embedding_grad_kernel(
    const acc_of<scalar_t>* __restrict__ g, const scalar_t* __restrict__ x, int64_t n, int64_t d, int64_t s0,
    int64_t s1, const acc_of<scalar_t>* __restrict__ x_inv, scalar_t* __restrict__ grad_x) {
  using acc_t = acc_of<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  for (int64_t i = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; i < n;
       i += int64_t(gridDim.x) * kWarpsPerBlock) {
    const acc_t* gr = g + i * d;
    const scalar_t* xr = x + i * s0;
    const acc_t xi = x_inv[i];
    acc_t radial = 0;
    for (int64_t k = lane; k < d; k += kWarp) radial += to_acc(xr[k * s1]) * xi * gr[k];
    radial = warp_sum(radial);
    const bool projected = xi * acc_t(kNormEps) < acc_t(1);
    scalar_t* out = grad_x + i * d;
    for (int64_t k = lane; k < d; k += kWarp) {
      const acc_t gk = gr[k];
      const acc_t v = projected ? gk - to_acc(xr[k * s1]) * xi * radial : gk;
      out[k] = from_acc<scalar_t>(v * xi);
    }
  }
}

__global__ void __launch_bounds__(kThreads) find_bad_label_kernel(const int64_t* __restrict__ labels, int64_t n,
                                                                  int64_t num_classes, int64_t ignore_index,
                                                                  unsigned long long* first_bad) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t y = labels[i];
    if (y != ignore_index && (y < 0 || y >= num_classes)) atomicMin(first_bad, static_cast<unsigned long long>(i));
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------

bool launch_normalize_rows(const void* x, Dtype dtype, int64_t rows, int64_t cols, int64_t s0, int64_t s1,
                           void* x_hat, void* inv, cudaStream_t stream) {
  if (rows == 0) return true;
  return dispatch_storage(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    normalize_rows_kernel<scalar_t><<<warp_row_blocks(rows), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(x), rows, cols, s0, s1, static_cast<scalar_t*>(x_hat),
        static_cast<acc_of<scalar_t>*>(inv));
  });
}

bool launch_forward_epilogue(Dtype acc, const void* s, int64_t n, int64_t t, const void* w_inv,
                             const int64_t* labels, int64_t class0, int64_t ignore_index,
                             const MarginParams<double>& margin, void* row_max, void* row_sum, void* target,
                             void* lse, bool first_chunk, cudaStream_t stream) {
  if (n == 0 || t == 0) return true;
  return dispatch_acc(acc, [&](auto tag) {
    using acc_t = typename decltype(tag)::type;
    forward_epilogue_kernel<acc_t><<<row_blocks(n), kThreads, 0, stream>>>(
        static_cast<const acc_t*>(s), n, t, static_cast<const acc_t*>(w_inv), labels, class0, ignore_index,
        margin, static_cast<acc_t*>(row_max), static_cast<acc_t*>(row_sum), static_cast<acc_t*>(target),
        static_cast<acc_t*>(lse), first_chunk);
  });
}

bool launch_backward_epilogue(Dtype acc, Dtype out, const void* s, void* b, int64_t n, int64_t t,
                              const void* w_inv, const int64_t* labels, int64_t class0, int64_t ignore_index,
                              const MarginParams<double>& margin, const void* lse, const void* grad_lse,
                              const void* grad_target, cudaStream_t stream) {
  if (n == 0 || t == 0) return true;
  // The supported pairs: (float32, float32 | bfloat16 | float16) and (float64, float64).
  if ((acc == Dtype::kFloat64) != (out == Dtype::kFloat64)) return false;
  return dispatch_acc(acc, [&](auto acc_tag) {
    using acc_t = typename decltype(acc_tag)::type;
    dispatch_storage(out, [&](auto out_tag) {
      using out_t = typename decltype(out_tag)::type;
      if constexpr (std::is_same_v<acc_of<out_t>, acc_t>) {
        backward_epilogue_kernel<acc_t, out_t><<<row_blocks(n), kThreads, 0, stream>>>(
            static_cast<const acc_t*>(s), static_cast<out_t*>(b), n, t, static_cast<const acc_t*>(w_inv), labels,
            class0, ignore_index, margin, static_cast<const acc_t*>(lse), static_cast<const acc_t*>(grad_lse),
            static_cast<const acc_t*>(grad_target));
      }
    });
  });
}

bool launch_project_weight_grad(Dtype dtype, const void* e, const void* w, int64_t t, int64_t d, int64_t s0,
                                int64_t s1, const void* w_inv, void* grad_w, cudaStream_t stream) {
  if (t == 0) return true;
  return dispatch_storage(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_of<scalar_t>;
    project_weight_grad_kernel<scalar_t><<<warp_row_blocks(t), kThreads, 0, stream>>>(
        static_cast<const acc_t*>(e), static_cast<const scalar_t*>(w), t, d, s0, s1,
        static_cast<const acc_t*>(w_inv), static_cast<scalar_t*>(grad_w));
  });
}

bool launch_embedding_grad(Dtype dtype, const void* g, const void* x, int64_t n, int64_t d, int64_t s0, int64_t s1,
                           const void* x_inv, void* grad_x, cudaStream_t stream) {
  if (n == 0) return true;
  return dispatch_storage(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_of<scalar_t>;
    embedding_grad_kernel<scalar_t><<<warp_row_blocks(n), kThreads, 0, stream>>>(
        static_cast<const acc_t*>(g), static_cast<const scalar_t*>(x), n, d, s0, s1,
        static_cast<const acc_t*>(x_inv), static_cast<scalar_t*>(grad_x));
  });
}

bool launch_find_bad_label(const int64_t* labels, int64_t n, int64_t num_classes, int64_t ignore_index,
                           int64_t* first_bad, cudaStream_t stream) {
  if (n == 0) return true;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  find_bad_label_kernel<<<static_cast<unsigned int>(blocks < 4096 ? blocks : 4096), kThreads, 0, stream>>>(
      labels, n, num_classes, ignore_index, reinterpret_cast<unsigned long long*>(first_bad));
  return true;
}

}  // namespace oclear::cuda

// Helpers shared by the CUDA glue of the ops (margin_softmax_cuda.cpp, class_topk_cuda.cpp): dtype
// mapping to the framework-free kernels, launch checks, the debug switches, class chunking and the
// chunk GEMM with float32 output. Only included under OCLEAR_WITH_CUDA.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "../cuda/margin_softmax.cuh"

// aten::mm.dtype (16-bit inputs, float32 output) exists from torch 2.8 on.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define OCLEAR_HAS_MM_OUT_DTYPE 1
#else
#define OCLEAR_HAS_MM_OUT_DTYPE 0
#endif

namespace oclear::cuda_glue {

inline cuda::Dtype to_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return cuda::Dtype::kFloat32;
    case at::kDouble: return cuda::Dtype::kFloat64;
    case at::kBFloat16: return cuda::Dtype::kBFloat16;
    case at::kHalf: return cuda::Dtype::kFloat16;
    default: break;
  }
  TORCH_CHECK_TYPE(false, op, "unsupported dtype ", t, " on CUDA");
}

// After every launcher call: `dispatched` false means the launcher has no kernel for these dtypes
// (a bug in the glue); then the CUDA launch error check.
inline void check_launch(bool dispatched, const char* op, const char* what) {
  TORCH_INTERNAL_ASSERT(dispatched, op, what, ": no CUDA kernel for this dtype combination");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline bool env_flag(const char* name, bool fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  return std::strcmp(v, "0") != 0;
}

// A new buffer: uninitialised, or poisoned under OCLEAR_CUDA_POISON=1 (debug: an element that no kernel writes
// then shows up in the results): NaN in floating buffers, -1 in integer ones (flags and indices).
inline at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  if (env_flag("OCLEAR_CUDA_POISON", false)) {
    const bool floating = at::isFloatingType(c10::typeMetaToScalarType(opts.dtype()));
    return at::full(sizes, floating ? std::numeric_limits<double>::quiet_NaN() : -1.0, opts);
  }
  return at::empty(sizes, opts);
}

// Classes per chunk: 32 Mi float32 scores (128 MiB; T = 32768 at N = 1024, D = 512). Larger chunks
// amortise the host's few ATen calls and launches per chunk, which matters more than keeping the scores
// in L2 with small chunks; past 32K the time barely improves while the scratch memory doubles per step
// (the sweep of T = 2K..64K at C = 1M: benchmarks/results/margin_softmax_cuda_bfloat16_chunk_sweep.json).
// forced > 0 (the ops' class_chunk argument) takes T = forced (the sweep and the tests, which cross
// chunk edges, use it). A T x D float32 buffer of the backward is held to the same size.
inline int64_t class_chunk(int64_t n, int64_t d, int64_t c_local, int64_t forced) {
  if (forced > 0) return std::min<int64_t>(forced, c_local);
  constexpr int64_t kChunkElements = int64_t(32) << 20;
  int64_t t = std::min(kChunkElements / std::max<int64_t>(n, 1), kChunkElements / std::max<int64_t>(d, 1));
  t = std::max<int64_t>(t / 256 * 256, 256);
  return std::min(t, c_local);
}

// out (float32 or float64) = a @ b, whatever 16-bit dtype a and b have (tensor cores, float32 out).
inline void mm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::mm_out(out, a, b);
    return;
  }
#if OCLEAR_HAS_MM_OUT_DTYPE
  at::mm_out(out, a, b, out.scalar_type());
#else
  out.copy_(at::mm(a, b));  // older torch: the product is rounded to 16 bits first
#endif
}

struct Normalized {
  at::Tensor x_hat;  // (N, D) input dtype, contiguous: the GEMM operand
  at::Tensor x_inv;  // (N,) accumulation dtype
};

inline Normalized normalize_rows(const at::Tensor& x, at::ScalarType acc, cudaStream_t stream, const char* op) {
  const int64_t n = x.size(0), d = x.size(1);
  Normalized out{new_buffer({n, d}, x.options()), new_buffer({n}, x.options().dtype(acc))};
  check_launch(cuda::launch_normalize_rows(x.data_ptr(), to_dtype(x.scalar_type(), op), n, d, x.stride(0),
                                           x.stride(1), out.x_hat.data_ptr(), out.x_inv.data_ptr(), stream),
               op, "normalize rows");
  return out;
}

// 1 / max(|w_c|, 1e-12) for the rows of w (any strides), in the accumulation dtype.
inline at::Tensor inverse_norms(const at::Tensor& w, at::ScalarType acc, cudaStream_t stream, const char* op) {
  at::Tensor inv = new_buffer({w.size(0)}, w.options().dtype(acc));
  check_launch(cuda::launch_normalize_rows(w.data_ptr(), to_dtype(w.scalar_type(), op), w.size(0), w.size(1),
                                           w.stride(0), w.stride(1), nullptr, inv.data_ptr(), stream),
               op, "inverse norms");
  return inv;
}

// 1 / max(|w_c|, 1e-12) of the rows of w written into inv (a slice of a longer vector, contiguous).
inline void inverse_norms_into(const at::Tensor& w, const at::Tensor& inv, cudaStream_t stream, const char* op) {
  check_launch(cuda::launch_normalize_rows(w.data_ptr(), to_dtype(w.scalar_type(), op), w.size(0), w.size(1),
                                           w.stride(0), w.stride(1), nullptr, inv.data_ptr(), stream),
               op, "inverse norms");
}

// The weight rows [c0, c0 + t) as a GEMM operand of the embeddings' dtype: a view, or (a float32 weight
// beside 16-bit embeddings) the chunk rounded to that dtype.
inline at::Tensor operand_chunk(const at::Tensor& weight, int64_t c0, int64_t t, at::ScalarType x_type) {
  const at::Tensor rows = weight.narrow(0, c0, t);
  return rows.scalar_type() == x_type ? rows : rows.to(x_type);
}

}  // namespace oclear::cuda_glue

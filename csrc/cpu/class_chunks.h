// Helpers shared by the CPU kernels that walk the classes in chunks (margin softmax, class top-k):
// chunk size, row normalisation, the weight chunk in the accumulation dtype, inverse row norms.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include <oclear/margin.h>

namespace oclear::cpu {

// Classes per chunk: large enough for the GEMMs to run at full rate on all threads, small enough
// for the N x T chunk of logits (2 MiB in float32) to stay in cache between the GEMM that writes it
// and the epilogue that reads it.
inline int64_t chunk_classes(int64_t n, int64_t forced = 0) {
  if (forced > 0) return forced;  // the op's class_chunk argument (tests cross chunk edges with tiny chunks)
  constexpr int64_t kChunkElements = 512 * 1024;
  const int64_t t = kChunkElements / std::max<int64_t>(n, 1);
  return std::clamp<int64_t>(t / 64 * 64, 256, 4096);
}

// Rows per parallel piece of an epilogue (each row is a few thousand elements of work).
constexpr int64_t kRowGrain = 16;

struct Normalized {
  at::Tensor x_hat;  // (N, D) acc dtype
  at::Tensor x_inv;  // (N,) 1 / max(|x|, eps)
};

inline Normalized normalize_rows(const at::Tensor& x, at::ScalarType acc) {
  const at::Tensor xa = x.to(acc).contiguous();
  const at::Tensor inv = at::linalg_vector_norm(xa, 2, {1}).clamp_min(kNormEps).reciprocal();
  return {xa * inv.unsqueeze(1), inv};
}

// The weight's dtype is the embeddings', or float32 beside 16-bit embeddings: the fp32-master-classifier
// convention of mixed precision (what autocast hands the op). The op then computes what it would on
// weight.to(embeddings.dtype), one chunk of classes at a time (never a 16-bit copy of the whole C x D
// weight), and the weight's gradient, float32, is the gradient at those rounded rows (a cast's
// backward is the identity).
inline bool compatible_weight_dtype(at::ScalarType x, at::ScalarType w) {
  return w == x || (w == at::kFloat && (x == at::kBFloat16 || x == at::kHalf));
}

// The weight rows [c0, c0 + t) in the accumulation dtype, as the embeddings' dtype rounds them: a view
// when no conversion is needed, else a copy into `buffer` (a float32 weight beside 16-bit embeddings
// is rounded to their dtype first, chunk by chunk).
template <typename scalar_t, typename acc_t>
inline at::Tensor weight_chunk(const at::Tensor& weight, int64_t c0, int64_t t, at::Tensor& buffer) {
  const at::Tensor rows = weight.narrow(0, c0, t);
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return rows;
  }
  at::Tensor out = buffer.narrow(0, 0, t);
  constexpr at::ScalarType x_type = c10::CppTypeToScalarType<scalar_t>::value;
  out.copy_(rows.scalar_type() == x_type ? rows : rows.to(x_type));
  return out;
}

template <typename acc_t>
inline void inverse_norms(const acc_t* w, int64_t t, int64_t d, acc_t* w_inv) {
  at::parallel_for(0, t, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const acc_t* row = w + c * d;
      acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t k = 0; k < d; ++k) ss += row[k] * row[k];
      w_inv[c] = acc_t(1) / std::max<acc_t>(std::sqrt(ss), acc_t(kNormEps));
    }
  });
}

}  // namespace oclear::cpu

// Element-wise epilogues of the CPU margin softmax, applied to one tile of raw dot products
// x^_i . w_c (rows i = batch, columns c = the tile's classes, row-major, `t` columns).
// Plain loops with `omp simd` so they vectorise without -ffast-math; the float versions are
// compiled once per ISA level (AVX-512, AVX2, baseline) and picked at load time.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include <oclear/fast_exp.h>
#include <oclear/margin.h>
#include <oclear/online_softmax.h>

// The *_impl templates must be inlined into the per-ISA clones of margin_softmax_epilogue.cpp:
// a call to an out-of-line copy would run baseline (SSE2) code.
#if defined(__GNUC__) || defined(__clang__)
#define OCLEAR_INLINE_INTO_CLONES inline __attribute__((always_inline))
#else
#define OCLEAR_INLINE_INTO_CLONES inline
#endif

namespace oclear::cpu {

inline float vexp(float x) { return fast_exp(x); }
inline double vexp(double x) { return std::exp(x); }

// Where in the tile row i's target class sits, or -1 when the tile does not hold it.
inline int64_t target_column(int64_t label, int64_t ignore_index, int64_t tile_class0, int64_t t) {
  if (label == ignore_index) return -1;
  const int64_t col = label - tile_class0;
  return (col >= 0 && col < t) ? col : -1;
}

// Forward: logits of one tile into online-softmax states (one per row) and target logits.
template <typename T>
OCLEAR_INLINE_INTO_CLONES void forward_tile_impl(T* __restrict tile, int64_t n, int64_t t, const T* __restrict w_inv,
                              const int64_t* labels, int64_t tile_class0, int64_t ignore_index, const MarginParams<T>& p,
                              T* target_out, SoftmaxState<T>* states) {
  const T scale = p.scale;
  const bool filter = p.has_filter;
  const T threshold = p.filter;
  for (int64_t i = 0; i < n; ++i) {
    T* __restrict row = tile + i * t;
    const int64_t tc = target_column(labels[i], ignore_index, tile_class0, t);
    const T raw_target = tc >= 0 ? row[tc] : T(0);
    T row_max = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : row_max)
    for (int64_t c = 0; c < t; ++c) {
      const T cs = clamp_unit(row[c] * w_inv[c]);
      const T z = (filter && cs > threshold) ? T(0) : scale * cs;
      row[c] = z;
      row_max = row_max > z ? row_max : z;
    }
    if (tc >= 0) {  // the target never takes the negative rule: margin, no filtering
      const T z = scale * target_cos(clamp_unit(raw_target * w_inv[tc]), p);
      row[tc] = z;
      target_out[i] = z;
      row_max = row_max > z ? row_max : z;
    }
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < t; ++c) sum += vexp(row[c] - row_max);
    states[i].merge(row_max, sum);
  }
}

// Backward: turns raw dot products into B_ic = dLoss/dcos_ic * w_inv_c, in place, where
//   dLoss/dz_ic = grad_lse_i * softmax_ic + grad_target_i * [c == y_i],  softmax_ic = exp(z_ic - lse_i)
// and dz/dcos is the scale (0 where filtered), times psi'(cos) on the target.
template <typename T>
OCLEAR_INLINE_INTO_CLONES void backward_tile_impl(T* __restrict tile, int64_t n, int64_t t, const T* __restrict w_inv,
                               const int64_t* labels, int64_t tile_class0, int64_t ignore_index, const MarginParams<T>& p,
                               const T* lse, const T* grad_lse, const T* grad_target) {
  const T scale = p.scale;
  const bool filter = p.has_filter;
  const T threshold = p.filter;
  for (int64_t i = 0; i < n; ++i) {
    T* __restrict row = tile + i * t;
    const int64_t tc = target_column(labels[i], ignore_index, tile_class0, t);
    const T g = grad_lse[i];
    const T g_target = tc >= 0 ? grad_target[i] : T(0);
    if (g == T(0) && g_target == T(0)) {  // ignored rows: nothing flows back
      for (int64_t c = 0; c < t; ++c) row[c] = T(0);
      continue;
    }
    const T raw_target = tc >= 0 ? row[tc] : T(0);
    const T row_lse = lse[i];
    const T g_scale = g * scale;
    // Two loops rather than a filter test inside one: a branch in the body made GCC version the
    // loop and run the scalar copy.
    if (filter) {
#pragma omp simd
      for (int64_t c = 0; c < t; ++c) {
        const T cs = clamp_unit(row[c] * w_inv[c]);
        const T grad = g_scale * vexp(scale * cs - row_lse) * w_inv[c];
        row[c] = cs > threshold ? T(0) : grad;
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < t; ++c) {
        const T cs = clamp_unit(row[c] * w_inv[c]);
        row[c] = g_scale * vexp(scale * cs - row_lse) * w_inv[c];
      }
    }
    if (tc >= 0) {
      const T cs = clamp_unit(raw_target * w_inv[tc]);
      const T z = scale * target_cos(cs, p);
      const T dz = g * vexp(z - row_lse) + g_target;
      row[tc] = dz * scale * target_cos_grad(cs, p) * w_inv[tc];
    }
  }
}

void forward_tile(float* tile, int64_t n, int64_t t, const float* w_inv, const int64_t* labels,
                  int64_t tile_class0, int64_t ignore_index, const MarginParams<float>& p,
                  float* target_out, SoftmaxState<float>* states);
void forward_tile(double* tile, int64_t n, int64_t t, const double* w_inv, const int64_t* labels,
                  int64_t tile_class0, int64_t ignore_index, const MarginParams<double>& p,
                  double* target_out, SoftmaxState<double>* states);
void backward_tile(float* tile, int64_t n, int64_t t, const float* w_inv, const int64_t* labels,
                   int64_t tile_class0, int64_t ignore_index, const MarginParams<float>& p,
                   const float* lse, const float* grad_lse, const float* grad_target);
void backward_tile(double* tile, int64_t n, int64_t t, const double* w_inv, const int64_t* labels,
                   int64_t tile_class0, int64_t ignore_index, const MarginParams<double>& p,
                   const double* lse, const double* grad_lse, const double* grad_target);

}  // namespace oclear::cpu

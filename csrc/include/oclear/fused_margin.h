// Per-element and per-row math of the fused margin-softmax kernels (backend "cutlass_sm90":
// csrc/cuda_sm90/margin_softmax_sm90.cu for the GEMM epilogues, csrc/cuda/margin_softmax_fused.cu for
// the per-row and per-class kernels), as __host__ __device__ functions so csrc/tests/test_fused_margin.cpp
// checks them on the host against float64. The algorithm is in docs/cuda.md ("The fused kernels for Hopper").
//
// Notation: raw = x^_i . w_c (the GEMM accumulator, unnormalised class row), w_inv = 1 / max(|w_c|, 1e-12),
// cos = clamp(raw * w_inv, -1, 1), s the scale, k = s * log2(e).
//
// Fixed shift. Both sides are normalised, so every logit is at most s and exp(z - s) <= 1: the forward
// sums exp(z - s) = exp2(k * cos - k) without a running max and without rescaling, which lets the sum be
// a plain column reduction of the GEMM epilogue. Its only failure is underflow, when every logit of a row
// is far below s (needs_true_max); such rows are recomputed with a true max.
//
// The target column. The epilogues never evaluate the margin: the forward masks the target column out and
// the per-row kernel adds exp(z_t - s) in float64 (summing all classes and subtracting the target would
// cancel catastrophically once p_t -> 1); the backward takes the target's dLoss/dcos from a per-row value
// computed in float64 (target_grad).
#pragma once

#include <cstdint>
#include <cstring>

#include "margin.h"

namespace oclear::fused {

constexpr double kLog2e = 1.44269504088896340736;

OCLEAR_HD float exp2_(float x) { return exp2f(x); }

// Constants of one call, derived once on the host from the margin parameters.
struct ShiftParams {
  float k;            // s * log2(e): exp(s * cos - s) = exp2(k * cos - k)
  float filtered;     // exp2(-k) = exp(0 - s): a filtered negative's logit is 0
  bool has_filter;
  float filter;       // negatives with cos > filter are filtered (logit 0, no gradient)
};

inline ShiftParams make_shift_params(const MarginParams<double>& p) {
  ShiftParams q{};
  q.k = static_cast<float>(p.scale * kLog2e);
  q.filtered = static_cast<float>(std::exp2(-p.scale * kLog2e));
  q.has_filter = p.has_filter;
  q.filter = static_cast<float>(p.filter);
  return q;
}

// Forward element: exp(z - s) of a negative class; 0 on the row's target column.
OCLEAR_HD float shifted_exp(float raw, float w_inv, bool is_target, const ShiftParams& p) {
  if (is_target) return 0.f;
  const float c = clamp_unit(raw * w_inv);
  if (p.has_filter && c > p.filter) return p.filtered;
  return exp2_(p.k * c - p.k);
}

// Backward element, B = dLoss/dcos * w_inv, for  Loss_i = g_i * lse_i + g_target_i * z_target_i:
//   negative: g_i * s * exp(s * cos - lse_i) * w_inv = exp2(k * cos - lse2_i) * gs_i * w_inv  (0 if filtered)
//   target:   gt_i * w_inv, gt_i from target_grad (float64 per row)
// lse2 = lse * log2(e) and gs = g * s are per-row inputs of the epilogue. The exponent k * cos - lse2 is at
// most about 0 for every row (lse >= the row's largest logit), so nothing overflows, whatever the fixed
// shift did in the forward.
OCLEAR_HD float recompute_grad(float raw, float w_inv, bool is_target, float lse2, float gs, float gt,
                               const ShiftParams& p) {
  if (is_target) return gt * w_inv;
  const float c = clamp_unit(raw * w_inv);
  if (p.has_filter && c > p.filter) return 0.f;
  return exp2_(p.k * c - lse2) * gs * w_inv;
}

// Round to the nearest bfloat16 (ties to even), returned widened: the value the epilogue stores. NaN stays
// NaN. Bit manipulation, so host and device agree without cuda_bf16.h.
OCLEAR_HD float round_to_bf16(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u) return x;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  float r;
  memcpy(&r, &u, sizeof(r));
  return r;
}

// One row's term of r_c = sum_i dLoss/dcos_ic * cos_ic, the coefficient of the weight-norm projection.
// With B the stored (rounded) element, B * raw = B * (w_c . x^_i), so sum_i B_ic raw_ic = w_c . E_c exactly
// where E = B^T x^ is what the dW GEMM accumulates from the same stored B: the projection below then
// removes E_c's component along w_c as precisely as projecting E_c itself would, without E ever being
// written.
OCLEAR_HD float projection_term(float stored_grad, float raw) { return stored_grad * raw; }

// dW_c = E_c - w_c * w_inv_c^2 * (w_c . E_c) = E_c + beta_c * w_c: the dW epilogue is fma(beta_c, w, acc).
// A row with |w_c| <= 1e-12 (w_inv clamped) gets E_c alone, as the unfused path does.
OCLEAR_HD float projection_coefficient(double r, float w_inv) {
  // The unfused path's test (csrc/cuda/margin_softmax.cu): projected while w_inv * eps < 1.
  if (!(w_inv * static_cast<float>(kNormEps) < 1.f)) return 0.f;
  return static_cast<float>(-static_cast<double>(w_inv) * static_cast<double>(w_inv) * r);
}

// Store-E mode. The forward also keeps E'_ic = exp(s cos - s) * w_inv in bf16 (0 on the target column and on
// filtered negatives, which get no gradient), so the backward needs no recompute GEMM:
//   B_ic = a_i * E'_ic  with  a_i = g_i * s * exp(s - lse_i)   (= recompute_grad's value for a negative)
//   B_iy = gt_i * w_inv_y  on the target column, as in recompute mode.
OCLEAR_HD float stored_exp(float e, float raw, float w_inv, const ShiftParams& p) {
  if (p.has_filter && clamp_unit(raw * w_inv) > p.filter) return 0.f;
  return e * w_inv;
}

OCLEAR_HD float stored_grad(float stored, float a, bool is_target, float gt, float w_inv) {
  return is_target ? gt * w_inv : a * stored;
}

// a_i of stored_grad, in float64 then rounded: exp(s - lse) can be large (lse < s when every cosine is below 1).
OCLEAR_HD float stored_row_scale(double g, double lse, double scale) { return static_cast<float>(g * scale * exp(scale - lse)); }

// Whether the store-E backward must recompute a row's logits rather than read its E'. E' keeps the forward's
// float32 exp2 values, flushed to 0 below 2^-126, and a_i = g s exp(s - lse) scales each: the flushed elements
// carry at most classes * 2^-126 * exp(s - lse) of the row's probability, under float32's 2^-24 while
// exp(lse - s) >= classes * 2^-102, the forward's needs_true_max bound on the same total. A row the forward
// took the true max for had a fixed-shift total below classes * 2^-102 and a true total at most
// classes * 2^-126 above that, so twice the bound flags every such row (and a few more, which only cost a
// recompute). NaN: flagged (the recompute keeps it NaN). Written with stored_row_scale's exp(scale - lse), which
// the compiler then evaluates once for both (inf, where lse is far below s, flags the row too).
OCLEAR_HD bool stored_row_lost(double lse, double scale, int64_t classes) {
  return !(exp(scale - lse) * (static_cast<double>(classes) * 0x1p-101) <= 1.0);
}

// The target's logit z_t = s * psi(cos_t) and its forward term exp(z_t - s), in float64.
struct TargetTerms {
  double logit;
  double shifted_exp;
};

OCLEAR_HD TargetTerms target_terms(double cos_t, const MarginParams<double>& p) {
  const double c = clamp_unit(cos_t);
  const double z = p.scale * target_cos(c, p);
  return {z, exp(z - p.scale)};
}

// dLoss/dcos of the target: (g * exp(z_t - lse) + g_target) * s * psi'(cos_t), in float64.
OCLEAR_HD double target_grad(double cos_t, double g, double g_target, double lse, const MarginParams<double>& p) {
  const double c = clamp_unit(cos_t);
  const double z = p.scale * target_cos(c, p);
  return (g * exp(z - lse) + g_target) * p.scale * target_cos_grad(c, p);
}

// The row's sum of its per-class-tile partials, in tile order and float64: the order is fixed by the data
// layout, not by which CTA finished first, so the result is the same on every run (no atomics).
OCLEAR_HD double merge_partials(const float* partial, int64_t tiles, int64_t stride) {
  double sum = 0.0;
  for (int64_t t = 0; t < tiles; ++t) sum += static_cast<double>(partial[t * stride]);
  return sum;
}

// Whether the fixed shift lost the row. Each float32 exp2 below 2^-126 is flushed to zero (fast math), an
// absolute error of at most 2^-126 per class; over `classes` terms at most classes * 2^-126. Keeping that
// below float32's relative precision 2^-24 of the total needs total >= classes * 2^-102. Below, the row is
// recomputed with a true max. Only rows whose every logit is below s - 70 or so get there (at s = 64: every
// cosine, the target's margin logit included, below about -0.1).
OCLEAR_HD bool needs_true_max(double total, int64_t classes) {
  return !(total >= static_cast<double>(classes) * 0x1p-102);  // also true for NaN: recompute, NaN stays
}

// lse of a row from its fixed-shift total.
OCLEAR_HD double shifted_lse(double total, double scale) { return scale + log(total); }

}  // namespace oclear::fused

// Margin transform of the target logit and its derivative, shared by the CPU and CUDA kernels.
//
//   psi(c) = cos(m1 * theta + m2) - m3,  theta = acos(c),  c = clamped cosine in [-1, 1]
//
// insightface's combined convention: CosFace (1, 0, m), ArcFace (1, m, 0), SphereFace (m, 0, 0).
// Where m1 * theta + m2 passes pi (theta > theta* = (pi - m2) / m1, i.e. c < c* = cos(theta*)),
// cos(.) would turn back up and reward a larger angle. There psi continues as the line of slope 1
// in c through (c*, -1 - m3): continuous, strictly increasing in c, so the target logit never rises
// with the angle and hard samples keep a gradient (insightface's "cos - m*sin(m)" fallback has the
// same slope but jumps at the boundary).
#pragma once

#include <algorithm>
#include <cmath>

#if defined(__CUDACC__)
#define OCLEAR_HD __host__ __device__ __forceinline__
#else
#define OCLEAR_HD inline
#endif

namespace oclear {

constexpr double kPi = 3.14159265358979323846;

// F.normalize's epsilon: x^ = x / max(|x|, kNormEps).
constexpr double kNormEps = 1e-12;

// The exact margin derivative divides by sin(theta), which is 0 at c = +-1. It is floored here.
// In float32 the smallest non-zero sin(theta) is about 3.5e-4 (c one ulp from 1), so the floor
// only acts at exactly c = +-1 there; in float64 it bounds psi' by m1 / kSinThetaFloor. With m2 = 0
// the derivative has a finite limit at c = 1 (m1^2), used instead of the floor.
constexpr double kSinThetaFloor = 1e-4;

OCLEAR_HD float acos_(float x) { return acosf(x); }
OCLEAR_HD double acos_(double x) { return acos(x); }
OCLEAR_HD float cos_(float x) { return cosf(x); }
OCLEAR_HD double cos_(double x) { return cos(x); }
OCLEAR_HD float sin_(float x) { return sinf(x); }
OCLEAR_HD double sin_(double x) { return sin(x); }
OCLEAR_HD float sqrt_(float x) { return sqrtf(x); }
OCLEAR_HD double sqrt_(double x) { return sqrt(x); }

// Clamp to [-1, 1]; a NaN stays NaN. On the host std::min / std::max, which GCC vectorises in the
// CPU epilogue loops (fminf / fmaxf, with their NaN rules, block that). On the device two selects
// (fmin / fmax would turn a NaN into -1 or 1 and hide it).
template <typename T>
OCLEAR_HD T clamp_unit(T c) {
#if defined(__CUDA_ARCH__)
  return c < T(-1) ? T(-1) : (c > T(1) ? T(1) : c);
#else
  return std::min(std::max(c, T(-1)), T(1));
#endif
}

// Everything a kernel needs to turn a raw dot product into a logit and back into a gradient.
// Built once on the host (in double) by make_margin_params, then cast to the accumulation type.
template <typename T>
struct MarginParams {
  T scale;
  T m1, m2, m3;
  T cos_boundary;     // c*: below it psi is the linear continuation
  bool additive;      // (m1, m2) == (1, 0): psi(c) = c - m3 exactly, psi' = 1, no acos needed
  bool has_filter;    // inter-class filtering on
  T filter;           // negatives with cos > filter count as cos = 0 and get no gradient
  bool straight_through;  // psi' := 1 (insightface's choice) instead of the exact derivative

  template <typename U>
  OCLEAR_HD MarginParams<U> cast() const {
    return MarginParams<U>{U(scale), U(m1), U(m2), U(m3), U(cos_boundary), additive,
                           has_filter, U(filter), straight_through};
  }
};

inline MarginParams<double> make_margin_params(double scale, double m1, double m2, double m3,
                                               bool has_filter, double filter,
                                               bool straight_through) {
  MarginParams<double> p{};
  p.scale = scale;
  p.m1 = m1;
  p.m2 = m2;
  p.m3 = m3;
  p.additive = (m1 == 1.0 && m2 == 0.0);
  p.cos_boundary = p.additive ? -1.0 : std::cos((kPi - m2) / m1);
  p.has_filter = has_filter;
  p.filter = filter;
  p.straight_through = straight_through;
  return p;
}

// psi(c) for c in [-1, 1].
template <typename T>
OCLEAR_HD T target_cos(T c, const MarginParams<T>& p) {
  if (p.additive) return c - p.m3;
  if (c < p.cos_boundary) return (c - p.cos_boundary) - T(1) - p.m3;
  return cos_(p.m1 * acos_(c) + p.m2) - p.m3;
}

// d psi / d c for c in [-1, 1], as used by the backward pass.
template <typename T>
OCLEAR_HD T target_cos_grad(T c, const MarginParams<T>& p) {
  if (p.straight_through || p.additive) return T(1);
  if (c < p.cos_boundary) return T(1);  // the linear continuation
  // (1 - c)(1 + c) keeps its relative precision near c = +-1, unlike 1 - c*c.
  const T one_minus_c2 = (T(1) - c) * (T(1) + c);
  const T sin_theta = sqrt_(one_minus_c2 > T(0) ? one_minus_c2 : T(0));
  const T floor = T(kSinThetaFloor);
  // Below the floor with m2 = 0 (SphereFace) the ratio m1 sin(m1 theta) / sin(theta) is smooth and
  // tends to m1^2 (error O(theta^2) < 1e-7 there); only with m2 > 0 does it really diverge.
  if (sin_theta < floor && p.m2 == T(0) && c > T(0)) return p.m1 * p.m1;
  return p.m1 * sin_(p.m1 * acos_(c) + p.m2) / (sin_theta > floor ? sin_theta : floor);
}

// Logit of a non-target class from its clamped cosine (inter-class filtering applied).
template <typename T>
OCLEAR_HD T negative_logit(T c, const MarginParams<T>& p) {
  return (p.has_filter && c > p.filter) ? T(0) : p.scale * c;
}

// d logit / d c of a non-target class: 0 where filtered, else the scale.
template <typename T>
OCLEAR_HD T negative_logit_grad(T c, const MarginParams<T>& p) {
  return (p.has_filter && c > p.filter) ? T(0) : p.scale;
}

}  // namespace oclear

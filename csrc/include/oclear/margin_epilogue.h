// Per-element math of the CUDA margin-softmax epilogues (csrc/cuda/margin_softmax.cu), written as
// __host__ __device__ functions so the C++ unit tests check it on the host (csrc/tests). The CPU
// epilogues compute the same quantities in vectorised loops (csrc/cpu/margin_softmax_epilogue.h).
//
// raw = x^_i . w_c (unnormalised class row), w_inv = 1 / |w_c|, cos = clamp(raw * w_inv, -1, 1).
// The target column's logit and gradient go through float64 whatever T is (one element per row and
// chunk), so fast-math approximations of cosf / acosf / sinf never touch the margin.
#pragma once

#include "margin.h"
#include "online_softmax.h"

namespace oclear {

// The logit z of one (row, class) element; is_target: the class is the row's label.
template <typename T>
OCLEAR_HD T epilogue_logit(T raw, T w_inv, bool is_target, const MarginParams<T>& p,
                           const MarginParams<double>& pd) {
  const T cs = clamp_unit(raw * w_inv);
  if (is_target) return static_cast<T>(pd.scale * target_cos(static_cast<double>(cs), pd));
  return negative_logit(cs, p);
}

// dLoss/dcos * w_inv of one element, for  Loss = g * lse + g_target * z_target  of its row:
//   dLoss/dz = g * exp(z - lse) + g_target * [target],  dz/dcos = scale * psi'(cos) on the target,
//   scale (0 where filtered) on a negative.
template <typename T>
OCLEAR_HD T epilogue_grad(T raw, T w_inv, bool is_target, T g, T g_target, T lse,
                          const MarginParams<T>& p, const MarginParams<double>& pd) {
  const T cs = clamp_unit(raw * w_inv);
  if (is_target) {
    const double cd = static_cast<double>(cs);
    const double z = pd.scale * target_cos(cd, pd);
    const double dz = static_cast<double>(g) * exp_(z - static_cast<double>(lse)) + static_cast<double>(g_target);
    return static_cast<T>(dz * pd.scale * target_cos_grad(cd, pd) * static_cast<double>(w_inv));
  }
  if (p.has_filter && cs > p.filter) return T(0);
  return g * p.scale * exp_(p.scale * cs - lse) * w_inv;
}

}  // namespace oclear

// Unit tests of the per-element epilogue math of the CUDA margin-softmax kernels
// (csrc/include/oclear/margin_epilogue.h), run on the host: the kernels call the same functions.
//   * epilogue_logit: the target's margin logit and the negatives' (filtered) logits, float and double
//     against a direct float64 evaluation;
//   * epilogue_grad: dLoss/dcos * w_inv against central finite differences of
//     Loss = g * lse(z(cos)) + g_target * z_target(cos) in float64, the w_inv scaling, the filter's
//     zero gradient, straight-through, and float against double;
//   * a row streamed through SoftmaxState::push with these logits gives the direct log-sum-exp.
// Same conventions as test_margin_math.cpp: "N passed, M failed", non-zero exit status on failure.

#include <oclear/margin.h>
#include <oclear/margin_epilogue.h>
#include <oclear/online_softmax.h>

#include "unit_check.h"

#include <algorithm>
#include <cmath>
#include <iomanip>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

using oclear::MarginParams;

struct Setting {
  double m1, m2, m3;
  bool has_filter;
  double filter;
};

const std::vector<Setting> kSettings = {
    {1.0, 0.0, 0.4, false, 0.0},   // CosFace
    {1.0, 0.5, 0.0, false, 0.0},   // ArcFace
    {1.7, 0.0, 0.0, false, 0.0},   // SphereFace
    {1.2, 0.3, 0.15, false, 0.0},  // combined
    {1.0, 0.5, 0.0, true, 0.3},    // ArcFace with inter-class filtering
    {1.2, 0.3, 0.15, true, -0.2},  // combined, aggressive filter
};

MarginParams<double> params(const Setting& s, double scale, bool straight_through = false) {
  return oclear::make_margin_params(scale, s.m1, s.m2, s.m3, s.has_filter, s.filter, straight_through);
}

// Direct float64 logit of a (clamped) cosine.
double direct_logit(double c, bool is_target, const MarginParams<double>& p) {
  if (is_target) return p.scale * oclear::target_cos(c, p);
  return (p.has_filter && c > p.filter) ? 0.0 : p.scale * c;
}

struct Row {
  std::vector<double> cos;
  int target;
};

double row_loss(const Row& row, double g, double g_target, const MarginParams<double>& p) {
  double m = -INFINITY;
  std::vector<double> z(row.cos.size());
  for (size_t k = 0; k < z.size(); ++k) {
    z[k] = direct_logit(row.cos[k], static_cast<int>(k) == row.target, p);
    m = std::max(m, z[k]);
  }
  double s = 0;
  for (double v : z) s += std::exp(v - m);
  return g * (m + std::log(s)) + (row.target >= 0 ? g_target * z[row.target] : 0.0);
}

double row_lse(const Row& row, const MarginParams<double>& p) { return row_loss(row, 1.0, 0.0, p); }

// True when c is within `gap` of a point where the logit is not differentiable (filter threshold,
// the margin's linear-continuation boundary, the clamp's ends).
bool near_kink(double c, bool is_target, const MarginParams<double>& p, double gap) {
  if (std::fabs(std::fabs(c) - 1.0) < gap) return true;
  if (is_target) return !p.additive && std::fabs(c - p.cos_boundary) < gap;
  return p.has_filter && std::fabs(c - p.filter) < gap;
}

void test_logits() {
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> unif(-1.2, 1.2), winv(0.05, 20.0);
  for (const Setting& st : kSettings) {
    const MarginParams<double> pd = params(st, 32.0);
    const MarginParams<float> pf = pd.cast<float>();
    double worst_d = 0, worst_f = 0;
    for (int trial = 0; trial < 20000; ++trial) {
      const double c = unif(rng), wi = winv(rng);
      const double raw = c / wi;  // so that raw * w_inv = c (up to rounding)
      const bool is_target = trial % 3 == 0;
      const double want = direct_logit(std::min(std::max(raw * wi, -1.0), 1.0), is_target, pd);
      worst_d = std::max(worst_d, std::fabs(oclear::epilogue_logit(raw, wi, is_target, pd, pd) - want));
      const float zf = oclear::epilogue_logit(static_cast<float>(raw), static_cast<float>(wi), is_target, pf, pd);
      // float rounding of raw, w_inv and their product moves cos by a few 1e-7; acos near +-1 by its
      // square root, so compare away from +-1 and the filter's step.
      const double cf = static_cast<double>(static_cast<float>(raw) * static_cast<float>(wi));
      if (!near_kink(cf, is_target, pd, 1e-3)) worst_f = std::max(worst_f, std::fabs(zf - want));
    }
    CHECK_MSG(worst_d <= 1e-12 * 32, "double logit error " << worst_d << " m=(" << st.m1 << "," << st.m2 << "," << st.m3 << ")");
    CHECK_MSG(worst_f <= 32 * 2e-5, "float logit error " << worst_f << " m=(" << st.m1 << "," << st.m2 << "," << st.m3 << ")");
  }
}

void test_gradient_finite_differences() {
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<double> unif(-0.95, 0.95);
  const double h = 1e-6;
  for (const Setting& st : kSettings) {
    for (double scale : {1.0, 16.0}) {
      const MarginParams<double> p = params(st, scale);
      double worst = 0;
      int checked = 0;
      for (int trial = 0; trial < 300; ++trial) {
        Row row{std::vector<double>(7), static_cast<int>(rng() % 8) - 1};  // target -1: not in this chunk
        for (double& c : row.cos) c = unif(rng);
        const double g = 0.25 + (rng() % 7) * 0.25, g_target = -g * ((rng() % 2) ? 1.0 : 0.5);
        const double lse = row_lse(row, p);
        for (size_t k = 0; k < row.cos.size(); ++k) {
          const bool is_target = static_cast<int>(k) == row.target;
          if (near_kink(row.cos[k], is_target, p, 10 * h)) continue;
          Row up = row, down = row;
          up.cos[k] += h;
          down.cos[k] -= h;
          const double fd = (row_loss(up, g, g_target, p) - row_loss(down, g, g_target, p)) / (2 * h);
          const double got = oclear::epilogue_grad(row.cos[k], 1.0, is_target, g, is_target ? g_target : 0.0, lse, p, p);
          worst = std::max(worst, std::fabs(got - fd) / std::max(1.0, std::fabs(fd)));
          ++checked;
        }
      }
      CHECK_MSG(checked > 1000 && worst < 1e-6, "finite differences: worst relative error " << worst << " over " << checked
                                                  << " elements, m=(" << st.m1 << "," << st.m2 << "," << st.m3
                                                  << ") filter " << st.has_filter << " scale " << scale);
    }
  }
}

void test_gradient_scaling_filter_straight_through_and_float() {
  std::mt19937_64 rng(13);
  std::uniform_real_distribution<double> unif(-0.99, 0.99), winv(0.1, 10.0);
  for (const Setting& st : kSettings) {
    const MarginParams<double> p = params(st, 24.0);
    const MarginParams<double> p_st = params(st, 24.0, /*straight_through=*/true);
    const MarginParams<float> pf = p.cast<float>();
    double worst_scale = 0, worst_float = 0, worst_st = 0;
    bool filtered_zero = true;
    for (int trial = 0; trial < 20000; ++trial) {
      const double c = unif(rng), wi = winv(rng), lse = 3.0 + unif(rng), g = 0.7, gt = -0.7;
      const bool is_target = trial % 4 == 0;
      const double raw = c / wi;
      // w_inv scaling: B = dLoss/dcos * w_inv.
      const double b = oclear::epilogue_grad(raw, wi, is_target, g, gt, lse, p, p);
      const double b1 = oclear::epilogue_grad(raw * wi, 1.0, is_target, g, gt, lse, p, p);
      worst_scale = std::max(worst_scale, std::fabs(b - b1 * wi) / std::max(1.0, std::fabs(b)));
      // the filter: a negative above the threshold gets exactly 0
      if (!is_target && st.has_filter && raw * wi > st.filter && b != 0.0) filtered_zero = false;
      // straight-through: the target's dz/dcos is the scale alone
      if (is_target) {
        const double cc = std::min(std::max(raw * wi, -1.0), 1.0);
        const double z = 24.0 * oclear::target_cos(cc, p);
        const double want = (g * std::exp(z - lse) + gt) * 24.0 * wi;
        worst_st = std::max(worst_st, std::fabs(oclear::epilogue_grad(raw, wi, true, g, gt, lse, p_st, p_st) - want) /
                                          std::max(1.0, std::fabs(want)));
      }
      // float against double, away from the kinks and from +-1 (acos)
      const float bf = oclear::epilogue_grad(static_cast<float>(raw), static_cast<float>(wi), is_target, static_cast<float>(g),
                                             static_cast<float>(gt), static_cast<float>(lse), pf, p);
      const double cf = static_cast<double>(static_cast<float>(raw) * static_cast<float>(wi));
      if (!near_kink(cf, is_target, p, 1e-2)) worst_float = std::max(worst_float, std::fabs(bf - b) / std::max(1.0, std::fabs(b)));
    }
    CHECK_MSG(worst_scale < 1e-12, "w_inv scaling error " << worst_scale);
    CHECK_MSG(filtered_zero, "a filtered negative got a gradient");
    CHECK_MSG(worst_st < 1e-12, "straight-through error " << worst_st);
    CHECK_MSG(worst_float < 1e-3, "float vs double gradient: worst relative error " << worst_float
                                      << " m=(" << st.m1 << "," << st.m2 << "," << st.m3 << ")");
  }
}

void test_streamed_row_lse() {
  std::mt19937_64 rng(17);
  std::uniform_real_distribution<double> unif(-1.0, 1.0);
  for (const Setting& st : kSettings) {
    const MarginParams<double> p = params(st, 64.0);
    double worst = 0;
    for (int trial = 0; trial < 200; ++trial) {
      Row row{std::vector<double>(1 + rng() % 300), -1};
      row.target = static_cast<int>(rng() % row.cos.size());
      for (double& c : row.cos) c = unif(rng);
      oclear::SoftmaxState<double> state = oclear::SoftmaxState<double>::empty();
      for (size_t k = 0; k < row.cos.size(); ++k) {
        state.push(oclear::epilogue_logit(row.cos[k], 1.0, static_cast<int>(k) == row.target, p, p));
      }
      worst = std::max(worst, std::fabs(state.log_sum_exp() - row_lse(row, p)) / std::max(1.0, std::fabs(row_lse(row, p))));
    }
    CHECK_MSG(worst < 1e-13, "streamed lse error " << worst);
  }
}

}  // namespace

int main() {
  test_logits();
  test_gradient_finite_differences();
  test_gradient_scaling_filter_straight_through_and_float();
  test_streamed_row_lse();
  return unit_check::finish();
}

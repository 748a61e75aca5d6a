// Unit tests of the fused margin-softmax math (csrc/include/oclear/fused_margin.h), run on the host: the
// CUTLASS epilogues and the per-row / per-class CUDA kernels call the same functions.
//   * the fixed shift: a row's sum of shifted_exp plus the float64 target term gives the float64 lse,
//     for every margin setting, with inter-class filtering, over a sweep of row offsets; where the
//     float32 sum would lose the row (device fast math flushes exp2 below 2^-126), needs_true_max says so,
//     and where it says not, the lse is accurate; the store-E backward's stored_row_lost flags every such
//     row, and the rows it reads from E' lose under 2^-24 of their probability to the flush;
//   * target masking: the target column contributes 0 to the sum and the row's margin logit is exact
//     even when p_t -> 1;
//   * recompute_grad against the unfused epilogue's gradient (margin_epilogue.h, float64);
//   * the projection identity: dW from stored bf16 B through fma(beta, w, E) with r_c summed from
//     projection_term is orthogonal to w_c and equals the float64 chain rule up to bf16 rounding;
//   * merge_partials: fixed order, float64, deterministic under any completion order;
//   * round_to_bf16: ties to even, NaN, infinities.
// Same conventions as the other tests here: "N passed, M failed", non-zero exit status on failure.

#include <oclear/fused_margin.h>
#include <oclear/margin.h>
#include <oclear/margin_epilogue.h>

#include "unit_check.h"

#include <algorithm>
#include <cmath>
#include <iomanip>
#include <iostream>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fz = oclear::fused;
using oclear::MarginParams;

struct Setting {
  double m1, m2, m3;
  bool has_filter;
  double filter;
};

const std::vector<Setting> kSettings = {
    {1.0, 0.0, 0.0, false, 0.0},   // plain normalised softmax
    {1.0, 0.0, 0.4, false, 0.0},   // CosFace
    {1.0, 0.5, 0.0, false, 0.0},   // ArcFace
    {1.7, 0.0, 0.0, false, 0.0},   // SphereFace
    {1.2, 0.3, 0.15, false, 0.0},  // combined
    {1.0, 0.5, 0.0, true, 0.3},    // ArcFace with inter-class filtering
};

MarginParams<double> params(const Setting& s, double scale) {
  return oclear::make_margin_params(scale, s.m1, s.m2, s.m3, s.has_filter, s.filter, false);
}

// The device computes exp2 with ex2.approx.ftz: results below 2^-126 are flushed to zero.
float device_shifted_exp(float raw, float w_inv, bool is_target, const fz::ShiftParams& p) {
  const float e = fz::shifted_exp(raw, w_inv, is_target, p);
  return e < 0x1p-126f ? 0.f : e;
}

// float64 lse of a row of cosines (target's margin logit, filtered negatives' logit 0).
double reference_lse(const std::vector<double>& cos, int target, const MarginParams<double>& p) {
  std::vector<double> z(cos.size());
  for (size_t c = 0; c < cos.size(); ++c) z[c] = oclear::epilogue_logit(cos[c], 1.0, static_cast<int>(c) == target, p, p);
  const double m = *std::max_element(z.begin(), z.end());
  double s = 0;
  for (double v : z) s += std::exp(v - m);
  return m + std::log(s);
}

// A row as the fused forward sees it: float32 raw / w_inv pairs, per-tile float32 partials of 256
// classes, merged in float64, plus the target term.
struct FusedRow {
  double lse;
  bool true_max;
};

FusedRow fused_row(const std::vector<float>& raw, const std::vector<float>& w_inv, int target,
                   const MarginParams<double>& p) {
  const fz::ShiftParams q = fz::make_shift_params(p);
  const int64_t tile = 256, tiles = (static_cast<int64_t>(raw.size()) + tile - 1) / tile;
  std::vector<float> partial(tiles, 0.f);
  for (size_t c = 0; c < raw.size(); ++c) {
    partial[c / tile] += device_shifted_exp(raw[c], w_inv[c], static_cast<int>(c) == target, q);
  }
  double total = fz::merge_partials(partial.data(), tiles, 1);
  if (target >= 0) total += fz::target_terms(static_cast<double>(raw[target]) * w_inv[target], p).shifted_exp;
  return {fz::shifted_lse(total, p.scale), fz::needs_true_max(total, static_cast<int64_t>(raw.size()))};
}

void test_fixed_shift_lse() {
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<double> spread(-0.25, 0.25), winv(0.2, 5.0);
  for (const Setting& st : kSettings) {
    for (double scale : {16.0, 64.0}) {
      const MarginParams<double> p = params(st, scale);
      const fz::ShiftParams q = fz::make_shift_params(p);
      double worst = 0, worst_flushed = 0;
      int kept = 0, flagged = 0, lost_missed = 0;
      // Offsets move every cosine of the row down together, through the range where float32 underflows.
      for (double offset : {0.6, 0.2, 0.0, -0.1, -0.3, -0.5, -0.7}) {
        for (int trial = 0; trial < 20; ++trial) {
          const int classes = 1 + static_cast<int>(rng() % 3000);
          std::vector<float> raw(classes), w_inv(classes);
          std::vector<double> cos(classes);
          for (int c = 0; c < classes; ++c) {
            w_inv[c] = static_cast<float>(winv(rng));
            raw[c] = static_cast<float>(std::clamp(offset + spread(rng), -1.0, 1.0) / w_inv[c]);
            cos[c] = std::clamp(static_cast<double>(raw[c] * w_inv[c]), -1.0, 1.0);  // what float32 sees
          }
          const int target = static_cast<int>(rng() % (classes + 1)) - 1;  // -1: not in this shard
          const FusedRow row = fused_row(raw, w_inv, target, p);
          const double want = reference_lse(cos, target, p);
          // Store-E: the backward recomputes every row the forward took the true max for, and on the rows it
          // reads from E', the elements the flush zeroed carry a negligible share of the probability.
          const bool lost = fz::stored_row_lost(want, p.scale, classes);
          if (row.true_max && !lost) ++lost_missed;
          if (!lost) {
            double flushed = 0;
            for (int c = 0; c < classes; ++c) {
              if (c != target && device_shifted_exp(raw[c], w_inv[c], false, q) == 0.f) {
                flushed += std::exp(oclear::epilogue_logit(cos[c], 1.0, false, p, p) - want);
              }
            }
            worst_flushed = std::max(worst_flushed, flushed);
          }
          if (row.true_max) {
            ++flagged;
            continue;
          }
          ++kept;
          worst = std::max(worst, std::fabs(row.lse - want) / std::max(1.0, std::fabs(want)));
        }
      }
      // float32 exp2 (1-2 ulp on the host; ex2.approx's 2 ulp on the device) and float32 tile sums.
      CHECK_MSG(worst < 2e-6, "fixed-shift lse error " << worst << " scale " << scale << " m=(" << st.m1 << ","
                                                        << st.m2 << "," << st.m3 << ")");
      CHECK_MSG(kept > 0, "no row kept the fixed shift at scale " << scale);
      CHECK_MSG(lost_missed == 0, lost_missed << " true-max rows not flagged by stored_row_lost at scale " << scale);
      CHECK_MSG(worst_flushed < 0x1p-24, "store-E reads a row whose flushed elements hold " << worst_flushed
                                                                                       << " of its probability");
      if (scale == 64.0 && st.m3 == 0.0 && !st.has_filter && st.m2 == 0.0 && st.m1 == 1.0) {
        CHECK_MSG(flagged > 0, "no row needed a true max at scale 64 with offsets down to -0.7");
      }
    }
  }
}

void test_true_max_threshold() {
  // s = 64: every cosine at -0.5 puts each term at exp(-96), under the float32 normal range (flushed on
  // the device): the sum is 0 and the row must be recomputed.
  const MarginParams<double> p = params(kSettings[0], 64.0);
  std::vector<float> raw(1000, -0.5f), w_inv(1000, 1.0f);
  CHECK_MSG(fused_row(raw, w_inv, -1, p).true_max, "all cosines -0.5 at s = 64 must need a true max");
  // A target in the shard with a large logit saves the row: its float64 term alone is exact.
  raw[17] = 0.9f;
  const FusedRow with_target = fused_row(raw, w_inv, 17, p);
  CHECK_MSG(!with_target.true_max, "a confident target keeps the fixed shift");
  std::vector<double> cos(raw.begin(), raw.end());
  CHECK_MSG(std::fabs(with_target.lse - reference_lse(cos, 17, p)) < 1e-9, "target-dominated lse");
  // NaN propagates as a recompute (whose result stays NaN), never as a finite lse.
  CHECK_MSG(fz::needs_true_max(std::nan(""), 10), "NaN total");
  CHECK_MSG(!fz::needs_true_max(1e-20, 1 << 22), "1e-20 over 4M classes is well above 4M * 2^-102");
  CHECK_MSG(fz::needs_true_max(1e-26, 1 << 22), "1e-26 over 4M classes is below 4M * 2^-102");
  CHECK_MSG(fz::stored_row_lost(std::nan(""), 64.0, 10), "NaN lse: recomputed");
  CHECK_MSG(fz::stored_row_lost(64.0 + std::log(0x1p-101 * 1000) - 1e-9, 64.0, 1000), "just under the bound");
  CHECK_MSG(!fz::stored_row_lost(64.0 + std::log(0x1p-101 * 1000) + 1e-9, 64.0, 1000), "just over the bound");
}

void test_target_masking() {
  // A confident row: p_t -> 1. The negatives' sum is tiny beside the target's term and each is exact.
  for (const Setting& st : kSettings) {
    const MarginParams<double> p = params(st, 64.0);
    const fz::ShiftParams q = fz::make_shift_params(p);
    CHECK_MSG(fz::shifted_exp(0.99f, 1.f, true, q) == 0.f, "target column must be masked");
    std::vector<float> raw(500, -0.2f), w_inv(500, 1.f);
    raw[3] = 0.999f;
    std::vector<double> cos(raw.begin(), raw.end());
    const double want = reference_lse(cos, 3, p);
    const FusedRow row = fused_row(raw, w_inv, 3, p);
    const double z_t = fz::target_terms(cos[3], p).logit;
    // The loss lse - z_t is ~1e-20 here: it must come out with a relative error near float32's, which a
    // sum over all classes minus the target could never give.
    const double loss_ref = want - z_t, loss = row.lse - z_t;
    CHECK_MSG(!row.true_max, "confident row keeps the fixed shift");
    CHECK_MSG(std::fabs(loss - loss_ref) <= 1e-5 * std::fabs(loss_ref) + 1e-300,
              "confident-row loss " << loss << " want " << loss_ref);
  }
  // Filtered negatives count exp(0 - s).
  const MarginParams<double> pf = params(kSettings[5], 16.0);
  const fz::ShiftParams qf = fz::make_shift_params(pf);
  CHECK_MSG(std::fabs(fz::shifted_exp(0.5f, 1.f, false, qf) - std::exp(-16.0)) < 1e-6 * std::exp(-16.0), "filtered term");
}

void test_recompute_grad() {
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<double> unif(-0.95, 0.95), winv(0.2, 5.0), gdist(0.1, 2.0);
  for (const Setting& st : kSettings) {
    const MarginParams<double> p = params(st, 32.0);
    const fz::ShiftParams q = fz::make_shift_params(p);
    double worst = 0;
    for (int trial = 0; trial < 5000; ++trial) {
      const double c = unif(rng), wi = winv(rng), g = gdist(rng), g_target = -gdist(rng);
      const float rawf = static_cast<float>(c / wi), wif = static_cast<float>(wi);
      const double cs = std::clamp(static_cast<double>(rawf * wif), -1.0, 1.0);
      const double lse = 20.0 + 10.0 * unif(rng);
      const bool is_target = trial % 4 == 0;
      const double gt = fz::target_grad(cs, g, g_target, lse, p);
      const float got = fz::recompute_grad(rawf, wif, is_target, static_cast<float>(lse * fz::kLog2e),
                                           static_cast<float>(g * p.scale), static_cast<float>(gt), q);
      const double want = oclear::epilogue_grad(cs, 1.0, is_target, g, g_target, lse, p, p) * static_cast<double>(wif);
      worst = std::max(worst, std::fabs(got - want) / std::max(1e-30, std::fabs(want) + 1e-12 * wi));
    }
    CHECK_MSG(worst < 5e-5, "recompute_grad relative error " << worst << " m=(" << st.m1 << "," << st.m2 << ","
                                                            << st.m3 << ")");
  }
}

void test_store_e() {
  // B from the stored E' equals recompute_grad up to the bf16 rounding of E'.
  std::mt19937_64 rng(23);
  std::uniform_real_distribution<double> unif(-0.9, 0.9), winv(0.2, 5.0);
  for (const Setting& st : kSettings) {
    const MarginParams<double> p = params(st, 32.0);
    const fz::ShiftParams q = fz::make_shift_params(p);
    double worst = 0;
    for (int trial = 0; trial < 3000; ++trial) {
      const float wi = static_cast<float>(winv(rng)), raw = static_cast<float>(unif(rng) / wi);
      const double g = 0.01, lse = 25.0 + 5 * unif(rng);
      const float e = fz::shifted_exp(raw, wi, false, q);
      const float stored = fz::round_to_bf16(fz::stored_exp(e, raw, wi, q));
      const float b = fz::stored_grad(stored, fz::stored_row_scale(g, lse, p.scale), false, 0.f, wi);
      const float want = fz::recompute_grad(raw, wi, false, static_cast<float>(lse * fz::kLog2e),
                                            static_cast<float>(g * p.scale), 0.f, q);
      worst = std::max(worst, static_cast<double>(want == 0.f ? std::fabs(b) : std::fabs(b - want) / std::fabs(want)));
    }
    CHECK_MSG(worst <= 0x1p-8 + 1e-5, "store-E gradient relative error " << worst);
  }
  const fz::ShiftParams qf = fz::make_shift_params(params(kSettings[5], 16.0));
  CHECK_MSG(fz::stored_exp(0.5f, 0.9f, 1.f, qf) == 0.f, "a filtered negative stores 0 (no gradient)");
  CHECK_MSG(fz::stored_grad(7.f, 2.f, true, 3.f, 0.5f) == 1.5f, "the target column takes gt * w_inv");
}

void test_projection_identity() {
  std::mt19937_64 rng(9);
  std::normal_distribution<double> normal(0.0, 1.0);
  const int n = 9, classes = 6, d = 32;
  const MarginParams<double> p = params(kSettings[2], 16.0);
  const fz::ShiftParams q = fz::make_shift_params(p);
  std::vector<double> x(n * d), w(classes * d), w_inv(classes);
  for (int i = 0; i < n; ++i) {
    double norm = 0;
    for (int k = 0; k < d; ++k) norm += (x[i * d + k] = normal(rng)) * x[i * d + k];
    for (int k = 0; k < d; ++k) x[i * d + k] /= std::sqrt(norm);
  }
  for (int c = 0; c < classes; ++c) {
    double norm = 0;
    for (int k = 0; k < d; ++k) norm += (w[c * d + k] = 3.0 * normal(rng)) * w[c * d + k];
    w_inv[c] = 1.0 / std::sqrt(norm);
  }
  std::vector<int> label(n);
  for (int i = 0; i < n; ++i) label[i] = static_cast<int>(rng() % classes);
  // Forward lse in float64, then per element the stored B and the r_c term, as the epilogues do.
  std::vector<double> raw(n * classes), lse(n);
  for (int i = 0; i < n; ++i) {
    std::vector<double> cos(classes);
    for (int c = 0; c < classes; ++c) {
      double dot = 0;
      for (int k = 0; k < d; ++k) dot += x[i * d + k] * w[c * d + k];
      raw[i * classes + c] = dot;
      cos[c] = dot * w_inv[c];
    }
    lse[i] = reference_lse(cos, label[i], p);
  }
  const double g = 1.0 / n, g_target = -1.0 / n;  // mean loss
  std::vector<double> stored(n * classes), r(classes, 0.0), grad_cos(n * classes);
  for (int i = 0; i < n; ++i) {
    for (int c = 0; c < classes; ++c) {
      const double rw = raw[i * classes + c];
      const bool is_target = c == label[i];
      const double gt = fz::target_grad(rw * w_inv[c], g, g_target, lse[i], p);
      const float b = fz::round_to_bf16(fz::recompute_grad(static_cast<float>(rw), static_cast<float>(w_inv[c]), is_target,
                                                           static_cast<float>(lse[i] * fz::kLog2e),
                                                           static_cast<float>(g * p.scale), static_cast<float>(gt), q));
      stored[i * classes + c] = b;
      r[c] += fz::projection_term(b, static_cast<float>(rw));
      grad_cos[i * classes + c] = oclear::epilogue_grad(rw * w_inv[c], 1.0, is_target, g, g_target, lse[i], p, p);
    }
  }
  double worst_orth = 0, worst_grad = 0;
  for (int c = 0; c < classes; ++c) {
    const float beta = fz::projection_coefficient(r[c], static_cast<float>(w_inv[c]));
    std::vector<double> dw(d), want(d);
    double e_norm = 0, dot_w = 0, want_norm = 0, err = 0;
    for (int k = 0; k < d; ++k) {
      double e = 0;
      for (int i = 0; i < n; ++i) e += stored[i * classes + c] * x[i * d + k];
      e_norm += e * e;
      dw[k] = std::fma(static_cast<double>(beta), w[c * d + k], e);
      dot_w += dw[k] * w[c * d + k];
    }
    // float64 chain rule: dW_c = w_inv (I - w^ w^T) sum_i dLoss/dcos_ic x^_i.
    std::vector<double> a(d, 0.0);
    double aw = 0;
    for (int k = 0; k < d; ++k) {
      for (int i = 0; i < n; ++i) a[k] += grad_cos[i * classes + c] * x[i * d + k];
      aw += a[k] * w[c * d + k] * w_inv[c];
    }
    for (int k = 0; k < d; ++k) {
      want[k] = w_inv[c] * (a[k] - aw * w[c * d + k] * w_inv[c]);
      want_norm += want[k] * want[k];
      err += (dw[k] - want[k]) * (dw[k] - want[k]);
    }
    worst_orth = std::max(worst_orth, std::fabs(dot_w) * w_inv[c] / std::sqrt(e_norm));
    worst_grad = std::max(worst_grad, std::sqrt(err / want_norm));
  }
  // Orthogonality is exact up to float32 rounding of r and beta (the bf16 rounding cancels: r is summed
  // from the stored values); the gradient itself carries the bf16 rounding of B.
  CHECK_MSG(worst_orth < 1e-6, "dW . w / |E| = " << worst_orth);
  CHECK_MSG(worst_grad < 1e-2, "dW relative error against float64 " << worst_grad);
  CHECK_MSG(fz::projection_coefficient(5.0, static_cast<float>(1.0 / oclear::kNormEps)) == 0.f, "clamped norm: E alone");
}

void test_merge_partials() {
  std::mt19937_64 rng(13);
  std::uniform_real_distribution<double> expo(-60.0, 0.0);
  const int64_t tiles = 16384, stride = 1024;  // C = 4M classes in tiles of 256, 1024 rows
  std::vector<float> partial(tiles * stride, -1.f);
  std::vector<double> exact(tiles);
  for (int64_t t = 0; t < tiles; ++t) exact[t] = partial[t * stride] = static_cast<float>(std::exp(expo(rng)));
  const double a = fz::merge_partials(partial.data(), tiles, stride);
  // Any completion order of the CTAs writes the same partials; the merge reads them in index order.
  const double b = fz::merge_partials(partial.data(), tiles, stride);
  CHECK_MSG(a == b, "merge must be deterministic");
  std::sort(exact.begin(), exact.end());  // smallest first: the most accurate float64 order
  const double want = std::accumulate(exact.begin(), exact.end(), 0.0);
  CHECK_MSG(std::fabs(a - want) <= 1e-12 * want, "float64 merge of 16384 partials: " << a << " want " << want);
}

void test_round_to_bf16() {
  CHECK_MSG(fz::round_to_bf16(1.0f) == 1.0f, "1 is exact");
  // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties to even gives 1.
  CHECK_MSG(fz::round_to_bf16(1.0f + 0x1p-8f) == 1.0f, "tie to even (down)");
  CHECK_MSG(fz::round_to_bf16(1.0f + 3 * 0x1p-8f) == 1.0f + 0x1p-6f, "tie to even (up)");
  CHECK_MSG(fz::round_to_bf16(1.0f + 0x1p-8f + 0x1p-20f) == 1.0f + 0x1p-7f, "above the tie rounds up");
  CHECK_MSG(std::isnan(fz::round_to_bf16(std::nanf(""))), "NaN stays NaN");
  CHECK_MSG(std::isinf(fz::round_to_bf16(INFINITY)), "inf stays inf");
  std::mt19937_64 rng(21);
  std::uniform_real_distribution<float> unif(-100.f, 100.f);
  double worst = 0;
  for (int i = 0; i < 10000; ++i) {
    const float v = unif(rng);
    worst = std::max(worst, std::fabs(static_cast<double>(fz::round_to_bf16(v)) - v) / std::fabs(v));
  }
  CHECK_MSG(worst <= 0x1p-8, "bf16 relative rounding error " << worst);
}

}  // namespace

int main() {
  test_fixed_shift_lse();
  test_true_max_threshold();
  test_target_masking();
  test_recompute_grad();
  test_store_e();
  test_projection_identity();
  test_merge_partials();
  test_round_to_bf16();
  return unit_check::finish();
}

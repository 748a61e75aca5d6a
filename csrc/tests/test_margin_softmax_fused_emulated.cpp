// The fused margin softmax's per-row and per-class CUDA kernels (csrc/cuda/margin_softmax_fused.cu) run on CPU
// threads through the CUDA emulation headers (csrc/tests/cuda_emulation), around host stand-ins for the
// CUTLASS GEMMs that write what their epilogues write by contract (csrc/cuda_sm90/margin_softmax_sm90.cuh,
// with fused_margin.h's functors), and the glue's sequence of calls (csrc/ops/margin_softmax_fused_cuda.cpp),
// checked against float64 on a class shard (class_start > 0) with labels in it, in another shard and ignored:
//   * target kernel: cosine, margin logit and exp(z - s) of the rows labelled in the shard, zeros elsewhere;
//   * finalize and true max: lse for every margin setting; rows whose fixed-shift sum underflows are
//     flagged and recomputed, no other row is;
//   * backward, recompute mode: B = dLoss/dcos * w_inv, the projection coefficients and dW = E + beta w, and
//     dx^ = B W, against the float64 chain rule;
//   * backward, store-E mode: B from E' in class chunks (offset c0, padded leading dimension); rows whose E'
//     the flush lost take recomputed logits, bit-identical to recompute mode's B;
//   * class counts that are not multiples of 8: the store-E forward's tail kernel (its classes' E' and their
//     sums onto the GEMM's last partial, or alone in a tile of their own) and recompute mode's tail B;
//   * the grid-stride loops: grids of one or a few blocks give bit-identical outputs to the launchers' grids.
// Also built with -fsanitize=thread and run with --quick (CMakeLists.txt): two CUDA threads of a block touching
// one word without a barrier between them fail it, as compute-sanitizer's racecheck would on a GPU.
// What this cannot show: the CUTLASS GEMMs themselves (the GPU run's job), speed.
// Same conventions as the other tests here: "N passed, M failed", non-zero exit status on failure.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda_emulation/cuda_emulation.h"

// The true-max kernel's static __shared__ arrays: one per kernel, shared by the block's threads (see
// cuda_emulation.h).
#undef __shared__
#define __shared__ static
#define OCLEAR_CUDA_EMULATION 1
#include "../cuda/margin_softmax_fused.cu"

#include <oclear/margin_epilogue.h>

#include "unit_check.h"

namespace {

namespace fz = oclear::fused;
namespace kc = oclear::cuda;
using oclear::MarginParams;
using bf16 = __nv_bfloat16;

constexpr int64_t kTileRows = 128, kTileClasses = 256;  // margin_softmax_sm90.cuh's CTA tile
constexpr int64_t kIgnore = -100;

float widen(bf16 v) { return __bfloat162float(v); }
int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

struct Setting {
  const char* name;
  double scale, m1, m2, m3;
  bool has_filter;
  double filter;
};

const Setting kSettings[] = {
    {"cosface s64", 64.0, 1.0, 0.0, 0.4, false, 0.0},
    {"arcface s64", 64.0, 1.0, 0.5, 0.0, false, 0.0},
    {"combined+filter s32", 32.0, 1.2, 0.3, 0.15, true, 0.35},
};

// A class shard of `classes` classes from class_start, n rows: x^ (normalised, then bf16) and raw bf16 class rows.
struct Problem {
  int64_t n, classes, d, class_start;
  std::vector<bf16> x_hat, w;
  std::vector<int64_t> labels;
  std::vector<float> w_inv, label_col;  // as the glue computes them
  std::vector<int> expect_lost;         // rows built so that the fixed shift underflows at s = 64
};

// mixed: labels in the shard (x near its class), in another shard and ignored. underflow: every cosine of the
// first three rows near -0.9 (two of them labelled in the shard), the rest random and ignored.
Problem make_problem(bool underflow, uint64_t seed) {
  Problem p;
  p.n = underflow ? 8 : 40;
  // Three class tiles each. Store-E and backward GEMMs take 600 (mixed: the tail's 3 classes share the last
  // tile with them) or 512 (underflow: the tail's 5 classes are the last tile's only ones).
  p.classes = underflow ? 517 : 603;
  p.d = 40;
  p.class_start = 1000;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> dir(p.d), w(p.classes * p.d), x(p.n * p.d);
  for (double& v : dir) v = normal(rng);
  for (int64_t c = 0; c < p.classes; ++c) {
    // Underflow: every cosine with dir near -0.95, class 17's near -0.5 (row 1's target, which then carries
    // much of its row's softmax: the true max must take it with its margin).
    const double along = c == 17 ? -0.17 : -1.0;
    for (int64_t k = 0; k < p.d; ++k) {
      w[c * p.d + k] = underflow ? along * dir[k] + 0.3 * normal(rng) : 2.0 * normal(rng);
    }
  }
  p.labels.resize(p.n);
  for (int64_t i = 0; i < p.n; ++i) {
    // Row 0 of the mixed problem is labelled in the tail classes (past the GEMMs' 600).
    const int64_t drawn = static_cast<int64_t>(rng() % p.classes), c = !underflow && i == 0 ? p.classes - 2 : drawn;
    if (underflow) {  // rows 1 and 2 labelled in the shard: the true max must take their margin logit
      p.labels[i] = i == 1 ? p.class_start + 17 : i == 2 ? p.class_start + c : kIgnore;
    } else if (i % 7 == 3) {
      p.labels[i] = kIgnore;
    } else if (i % 7 == 5) {
      p.labels[i] = (i % 2) ? 7 : p.class_start + p.classes + 11;  // another shard's class
    } else {
      p.labels[i] = p.class_start + c;
    }
    for (int64_t k = 0; k < p.d; ++k) {
      x[i * p.d + k] = underflow ? (i < 3 ? dir[k] : normal(rng)) : 0.5 * w[c * p.d + k] + normal(rng);
    }
    if (underflow && i < 3) p.expect_lost.push_back(static_cast<int>(i));
  }
  for (int64_t i = 0; i < p.n; ++i) {
    double norm = 0;
    for (int64_t k = 0; k < p.d; ++k) norm += x[i * p.d + k] * x[i * p.d + k];
    for (int64_t k = 0; k < p.d; ++k) {
      p.x_hat.push_back(__float2bfloat16(static_cast<float>(x[i * p.d + k] / std::sqrt(norm))));
    }
  }
  for (double v : w) p.w.push_back(__float2bfloat16(static_cast<float>(v)));
  for (int64_t c = 0; c < p.classes; ++c) {
    double norm = 0;
    for (int64_t k = 0; k < p.d; ++k) norm += double(widen(p.w[c * p.d + k])) * widen(p.w[c * p.d + k]);
    p.w_inv.push_back(static_cast<float>(1.0 / std::max(std::sqrt(norm), oclear::kNormEps)));
  }
  for (int64_t y : p.labels) {
    const int64_t local = y - p.class_start;
    p.label_col.push_back(y != kIgnore && local >= 0 && local < p.classes ? static_cast<float>(local) : -1.f);
  }
  return p;
}

// The GEMM accumulator x^_i . w_c in float32, k in order (the stand-ins' and the store-E recompute's order).
float raw_dot(const Problem& p, int64_t i, int64_t c) {
  float acc = 0.f;
  for (int64_t k = 0; k < p.d; ++k) acc = std::fma(widen(p.x_hat[i * p.d + k]), widen(p.w[c * p.d + k]), acc);
  return acc;
}

// The device's exp2 is ex2.approx.ftz: below 2^-126 it gives 0.
float device_shifted_exp(float raw, float w_inv, bool is_target, const fz::ShiftParams& q) {
  const float e = fz::shifted_exp(raw, w_inv, is_target, q);
  return e < 0x1p-126f ? 0.f : e;
}

// float64 reference: lse, the target logit and B_ref = dLoss/dcos * w_inv for Loss_i = g_i lse_i + gt_i z_t,i.
struct Reference {
  std::vector<double> lse, target_logit, target_cos, b;  // b: n x classes
};

Reference reference(const Problem& p, const MarginParams<double>& m, const std::vector<float>& g,
                    const std::vector<float>& g_target) {
  Reference r;
  r.b.assign(p.n * p.classes, 0.0);
  for (int64_t i = 0; i < p.n; ++i) {
    const int64_t y = p.label_col[i] >= 0 ? static_cast<int64_t>(p.label_col[i]) : -1;
    std::vector<double> z(p.classes), cos(p.classes);
    for (int64_t c = 0; c < p.classes; ++c) {
      double dot = 0;
      for (int64_t k = 0; k < p.d; ++k) dot += double(widen(p.x_hat[i * p.d + k])) * widen(p.w[c * p.d + k]);
      cos[c] = oclear::clamp_unit(dot * p.w_inv[c]);
      z[c] = oclear::epilogue_logit(cos[c], 1.0, c == y, m, m);
    }
    const double mx = *std::max_element(z.begin(), z.end());
    double sum = 0;
    for (double v : z) sum += std::exp(v - mx);
    const double lse = mx + std::log(sum);
    r.lse.push_back(lse);
    r.target_logit.push_back(y >= 0 ? z[y] : 0.0);
    r.target_cos.push_back(y >= 0 ? cos[y] : 0.0);
    for (int64_t c = 0; c < p.classes; ++c) {
      r.b[i * p.classes + c] =
          oclear::epilogue_grad(cos[c], 1.0, c == y, double(g[i]), double(g_target[i]), lse, m, m) * p.w_inv[c];
    }
  }
  return r;
}

unsigned grid_of(int64_t items, int64_t per_block) { return static_cast<unsigned>(kc::blocks_for(items, per_block)); }

// The forward as the glue runs it; `small_grids` launches every kernel with one or two blocks instead.
struct Forward {
  std::vector<float> lse, target_logit, target_cos;
  std::vector<double> target_exp;
  std::vector<int32_t> true_max;
  std::vector<bf16> stored;  // n x ld_stored
  int64_t ld_stored = 0;
};

// The first classes - classes % 8 go through the store-E and backward GEMMs, the rest through CUDA-core kernels
// (the glue's gemm_classes).
int64_t gemm_classes(int64_t classes) { return classes / 8 * 8; }

// The forward as the glue runs it: store = false, the forward GEMM over every class; store = true, the store-E
// GEMM over the GEMM classes (partials and E'), then the tail kernel for the rest. `small_grids` launches every
// kernel with one or a few blocks instead of the launchers' grids.
Forward run_forward(const Problem& p, const MarginParams<double>& m, bool store, bool small_grids) {
  const int64_t n = p.n, classes = p.classes;
  Forward f;
  f.target_logit.assign(n, -1.f);
  f.target_cos.assign(n, -1.f);
  f.target_exp.assign(n, -1.0);
  cuda_emulation::launch(small_grids ? 1u : grid_of(n, kc::kWarps), kc::kThreads, [&] {
    kc::target_kernel(p.x_hat.data(), p.w.data(), p.w_inv.data(), p.labels.data(), n, p.d, p.class_start, classes,
                      kIgnore, m, f.target_logit.data(), f.target_cos.data(), f.target_exp.data());
  });
  // The GEMM's epilogue: per (row, class tile) partial sums of the classes it takes, and (store-E) their E'.
  const fz::ShiftParams q = fz::make_shift_params(m);
  const int64_t m_pad = round_up(n, kTileRows), tiles = (classes + kTileClasses - 1) / kTileClasses;
  const int64_t c_gemm = store ? gemm_classes(classes) : classes;
  f.ld_stored = round_up(classes, 8);
  std::vector<float> partial(tiles * m_pad, std::nanf(""));  // what nothing writes stays NaN
  f.stored.assign(n * f.ld_stored, __float2bfloat16(std::nanf("")));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t t = 0; t * kTileClasses < c_gemm; ++t) {
      float sum = 0.f;
      for (int64_t c = t * kTileClasses; c < std::min(c_gemm, (t + 1) * kTileClasses); ++c) {
        const float raw = raw_dot(p, i, c);
        const float e = device_shifted_exp(raw, p.w_inv[c], static_cast<float>(c) == p.label_col[i], q);
        sum += e;
        f.stored[i * f.ld_stored + c] = __float2bfloat16(fz::stored_exp(e, raw, p.w_inv[c], q));
      }
      partial[t * m_pad + i] = sum;
    }
  }
  if (store && c_gemm < classes) {
    const int64_t tile = (classes - 1) / kTileClasses;
    cuda_emulation::launch(small_grids ? 1u : grid_of(n, kc::kThreads), kc::kThreads, [&] {
      kc::store_tail_kernel(p.x_hat.data(), p.w.data(), p.w_inv.data(), p.label_col.data(), n, p.d, c_gemm,
                            classes - c_gemm, q, partial.data() + tile * m_pad, c_gemm > tile * kTileClasses,
                            f.stored.data(), f.ld_stored);
    });
  }
  f.lse.assign(n, std::nanf(""));
  f.true_max.assign(n, -1);
  cuda_emulation::launch(small_grids ? 1u : grid_of(n, kc::kThreads), kc::kThreads, [&] {
    kc::finalize_kernel(partial.data(), m_pad, tiles, f.target_exp.data(), n, classes, m.scale, f.lse.data(),
                        f.true_max.data());
  });
  cuda_emulation::launch(small_grids ? 2u : grid_of(n, 1), kc::kThreads, [&] {
    kc::true_max_kernel(f.true_max.data(), p.x_hat.data(), p.w.data(), p.w_inv.data(), p.labels.data(), n, p.d,
                        p.class_start, classes, kIgnore, m, f.target_logit.data(), f.lse.data());
  });
  return f;
}

struct Backward {
  std::vector<float> lse2, gs, gt, row_scale;
  std::vector<int32_t> lost;
  std::vector<float> b;      // n x classes, the bf16 B widened
  std::vector<double> beta;  // the projection coefficients (recompute mode's GEMM classes: the kernel's)
};

// Recompute mode (chunks of `chunk` classes, a multiple of 256, over the GEMM classes, then the tail classes' B
// from the CUDA-core kernel), or store-E mode from f.stored, as the glue runs them.
Backward run_backward(const Problem& p, const MarginParams<double>& m, const Forward& f, const std::vector<float>& g,
                      const std::vector<float>& g_target, bool store, int64_t chunk, bool small_grids) {
  const int64_t n = p.n, classes = p.classes, d = p.d;
  const fz::ShiftParams q = fz::make_shift_params(m);
  Backward out;
  out.lse2.assign(n, 0.f);
  out.gs.assign(n, 0.f);
  out.gt.assign(n, 0.f);
  out.row_scale.assign(n, std::nanf(""));
  out.lost.assign(n, -1);
  cuda_emulation::launch(small_grids ? 1u : grid_of(n, kc::kThreads), kc::kThreads, [&] {
    kc::row_grads_kernel(f.target_cos.data(), p.label_col.data(), g.data(), g_target.data(), f.lse.data(), n, classes,
                         m, out.lse2.data(), out.gs.data(), out.gt.data(), store ? out.row_scale.data() : nullptr,
                         store ? out.lost.data() : nullptr);
  });
  out.b.assign(n * classes, std::nanf(""));
  out.beta.assign(classes, std::nan(""));
  const int64_t ld = round_up(chunk, 8) + 8;  // a padded leading dimension, as round_up(t_max, 8) can be
  std::vector<bf16> b(n * ld);
  const int64_t c_gemm = store ? 0 : gemm_classes(classes);
  auto run_chunk = [&](int64_t c0, int64_t t) {
    std::fill(b.begin(), b.end(), __float2bfloat16(std::nanf("")));
    if (c0 >= c_gemm) {  // store-E, or recompute mode's tail classes (stored null: every row recomputes)
      const unsigned gx = small_grids ? 1u : grid_of(t, kc::kThreads), gy = small_grids ? 3u : static_cast<unsigned>(n);
      cuda_emulation::launch(cuda_emulation::Index{gx, gy, 1}, kc::kThreads, [&] {
        kc::stored_grad_kernel(store ? f.stored.data() : nullptr, f.ld_stored, c0, t, n,
                               store ? out.row_scale.data() : nullptr, p.label_col.data(), out.gt.data(),
                               p.w_inv.data() + c0, store ? out.lost.data() : nullptr, p.x_hat.data(),
                               p.w.data() + c0 * d, d, out.lse2.data(), out.gs.data(), q, b.data(), ld);
      });
    } else {  // the recompute GEMM's epilogue: B and the per-row-tile sums r_c, then the projection kernel
      const int64_t t_pad = round_up(t, kTileClasses), row_tiles = (n + kTileRows - 1) / kTileRows;
      std::vector<float> r_partial(row_tiles * t_pad, 0.f), beta(t, std::nanf(""));
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t c = 0; c < t; ++c) {
          const float raw = raw_dot(p, i, c0 + c);
          const float v = fz::recompute_grad(raw, p.w_inv[c0 + c], static_cast<float>(c0 + c) == p.label_col[i],
                                             out.lse2[i], out.gs[i], out.gt[i], q);
          b[i * ld + c] = __float2bfloat16(v);
          r_partial[(i / kTileRows) * t_pad + c] += fz::projection_term(widen(b[i * ld + c]), raw);
        }
      }
      cuda_emulation::launch(small_grids ? 1u : grid_of(t, kc::kThreads), kc::kThreads, [&] {
        kc::projection_kernel(r_partial.data(), row_tiles, t_pad, p.w_inv.data() + c0, t, beta.data());
      });
      std::copy(beta.begin(), beta.end(), out.beta.begin() + c0);
    }
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t c = 0; c < t; ++c) out.b[i * classes + c0 + c] = widen(b[i * ld + c]);
    }
  };
  for (int64_t c0 = 0; c0 < c_gemm; c0 += chunk) run_chunk(c0, std::min(chunk, c_gemm - c0));
  for (int64_t c0 = c_gemm; c0 < classes; c0 += chunk) run_chunk(c0, std::min(chunk, classes - c0));
  // The classes whose dW the chunked path's projection kernel finishes (from E = B^T x^): its coefficient in
  // float64 from the same B.
  for (int64_t c = c_gemm; c < classes; ++c) {
    double r = 0;
    for (int64_t i = 0; i < n; ++i) r += double(out.b[i * classes + c]) * raw_dot(p, i, c);
    out.beta[c] = -double(p.w_inv[c]) * p.w_inv[c] * r;
  }
  return out;
}

template <typename A, typename B>
bool same_bits(const std::vector<A>& a, const std::vector<B>& b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](A x, B y) {
           return std::memcmp(&x, &y, sizeof x) == 0;
         });
}

double relative_error(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t k = 0; k < got.size(); ++k) num += (got[k] - want[k]) * (got[k] - want[k]), den += want[k] * want[k];
  return std::sqrt(num / std::max(den, 1e-300));
}

// dx^ = B W and dW_c = E_c + beta_c w_c (E = B^T x^), both in float64, from a B (n x classes).
void gradients(const Problem& p, const std::vector<double>& b, const std::vector<double>& beta,
               std::vector<double>& dx, std::vector<double>& dw) {
  dx.assign(p.n * p.d, 0.0);
  dw.assign(p.classes * p.d, 0.0);
  for (int64_t i = 0; i < p.n; ++i) {
    for (int64_t c = 0; c < p.classes; ++c) {
      for (int64_t k = 0; k < p.d; ++k) {
        dx[i * p.d + k] += b[i * p.classes + c] * widen(p.w[c * p.d + k]);
        dw[c * p.d + k] += b[i * p.classes + c] * widen(p.x_hat[i * p.d + k]);
      }
    }
  }
  for (int64_t c = 0; c < p.classes; ++c) {
    for (int64_t k = 0; k < p.d; ++k) dw[c * p.d + k] += beta[c] * widen(p.w[c * p.d + k]);
  }
}

void check_setting(const Problem& p, const Setting& st, bool underflow) {
  const MarginParams<double> m =
      oclear::make_margin_params(st.scale, st.m1, st.m2, st.m3, st.has_filter, st.filter, false);
  const std::string where = std::string(st.name) + (underflow ? " (underflow problem)" : " (mixed problem)");
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<double> unif(0.2, 1.0);
  std::vector<float> g(p.n), g_target(p.n);
  for (int64_t i = 0; i < p.n; ++i) g[i] = static_cast<float>(unif(rng) / p.n), g_target[i] = -g[i];
  const Reference ref = reference(p, m, g, g_target);

  // Forward.
  const Forward f = run_forward(p, m, false, false);
  double cos_err = 0, logit_err = 0, exp_err = 0, lse_err = 0;
  int zero_rows_ok = 0, zero_rows = 0, flagged = 0, flag_wrong = 0;
  for (int64_t i = 0; i < p.n; ++i) {
    lse_err = std::max(lse_err, std::fabs(f.lse[i] - ref.lse[i]));
    const bool expect_flag = std::find(p.expect_lost.begin(), p.expect_lost.end(), i) != p.expect_lost.end();
    flagged += f.true_max[i] == 1;
    if (underflow && st.scale == 64.0 && (f.true_max[i] == 1) != expect_flag) ++flag_wrong;
    if (p.label_col[i] < 0) {
      ++zero_rows;
      zero_rows_ok += f.target_logit[i] == 0.f && f.target_cos[i] == 0.f && f.target_exp[i] == 0.0;
      continue;
    }
    cos_err = std::max(cos_err, std::fabs(f.target_cos[i] - ref.target_cos[i]));
    logit_err = std::max(logit_err, std::fabs(f.target_logit[i] - ref.target_logit[i]));
    exp_err = std::max(exp_err, std::fabs(f.target_exp[i] / std::exp(ref.target_logit[i] - st.scale) - 1.0));
  }
  CHECK_MSG(cos_err < 2e-6, where << ": target cosine error " << cos_err);
  CHECK_MSG(logit_err < 5e-4, where << ": target logit error " << logit_err);
  CHECK_MSG(exp_err < 5e-4, where << ": target exp(z - s) relative error " << exp_err);
  CHECK_MSG(zero_rows > 0 && zero_rows_ok == zero_rows, where << ": " << zero_rows - zero_rows_ok << " of " << zero_rows
                                                              << " rows labelled outside the shard got target terms");
  CHECK_MSG(lse_err < 2e-4, where << ": lse error " << lse_err);
  if (underflow && st.scale == 64.0) {
    CHECK_MSG(flag_wrong == 0 && flagged == static_cast<int>(p.expect_lost.size()),
              where << ": true-max flags: " << flagged << " raised, " << flag_wrong << " wrong");
  } else if (!underflow) {
    CHECK_MSG(flagged == 0, where << ": " << flagged << " rows took the true max");
  }
  // The store-E forward: its GEMM's classes, then the tail kernel's (onto the GEMM's last partial or alone).
  const Forward f_store = run_forward(p, m, true, false);
  double store_lse_err = 0;
  for (int64_t i = 0; i < p.n; ++i) store_lse_err = std::max(store_lse_err, std::fabs(f_store.lse[i] - ref.lse[i]));
  CHECK_MSG(store_lse_err < 2e-4, where << ": store-E forward lse error " << store_lse_err);
  CHECK_MSG(same_bits(f_store.true_max, f.true_max), where << ": the store-E forward flags other rows");
  const Forward f_small = run_forward(p, m, true, true);
  CHECK_MSG(same_bits(f_small.lse, f_store.lse) && same_bits(f_small.target_logit, f_store.target_logit) &&
                same_bits(f_small.true_max, f_store.true_max) && same_bits(f_small.target_exp, f_store.target_exp) &&
                same_bits(f_small.stored, f_store.stored),
            where << ": the forward's outputs depend on the grid");

  // Backward, both modes (each from its own forward), in chunks of 256 classes and as one chunk.
  const Backward rec = run_backward(p, m, f, g, g_target, false, 256, false);
  const Backward rec_one = run_backward(p, m, f, g, g_target, false, 768, false);
  const Backward sto = run_backward(p, m, f_store, g, g_target, true, 256, false);
  const Backward sto_small = run_backward(p, m, f_store, g, g_target, true, 512, true);
  CHECK_MSG(same_bits(rec.b, rec_one.b) && same_bits(rec.beta, rec_one.beta),
            where << ": recompute mode depends on the chunk size");
  CHECK_MSG(same_bits(sto.b, sto_small.b), where << ": store-E mode depends on the chunk size or the grid");
  const Backward rec_small = run_backward(p, m, f, g, g_target, false, 256, true);
  CHECK_MSG(same_bits(rec.b, rec_small.b) && same_bits(rec.beta, rec_small.beta) && same_bits(rec.gt, rec_small.gt),
            where << ": recompute mode depends on the grid");

  double b_err = 0, b_store_err = 0, b_max = 0;
  for (double v : ref.b) b_max = std::max(b_max, std::fabs(v));
  for (size_t k = 0; k < ref.b.size(); ++k) {
    const double tol = std::fabs(ref.b[k]) + 1e-6 * b_max;
    b_err = std::max(b_err, std::fabs(rec.b[k] - ref.b[k]) / tol);
    b_store_err = std::max(b_store_err, std::fabs(sto.b[k] - ref.b[k]) / tol);
  }
  // bf16 stores (unit roundoff 2^-8): B rounded once in recompute mode, E' and then B in store-E mode; the
  // float32 logits and exp2 add about 1e-5.
  CHECK_MSG(b_err < 0x1p-8 * 1.05, where << ": recompute B relative error " << b_err);
  CHECK_MSG(b_store_err < 0x1p-7 * 1.05, where << ": store-E B relative error " << b_store_err);
  int lost = 0, lost_rows_equal = 0;
  for (int64_t i = 0; i < p.n; ++i) {
    if (sto.lost[i] != 1) continue;
    ++lost;
    bool equal = true;
    for (int64_t c = 0; c < p.classes; ++c) equal &= sto.b[i * p.classes + c] == rec.b[i * p.classes + c];
    lost_rows_equal += equal;
  }
  CHECK_MSG(lost == flagged, where << ": store-E recomputes " << lost << " rows, the forward took the true max on "
                                   << flagged);
  CHECK_MSG(lost_rows_equal == lost, where << ": " << lost - lost_rows_equal
                                           << " recomputed store-E rows differ from recompute mode");

  // beta from the kernel against float64 from the same bf16 B, then the gradients against the chain rule.
  std::vector<double> b_rec(rec.b.begin(), rec.b.end()), beta_want(p.classes), beta_got = rec.beta;
  for (int64_t c = 0; c < p.classes; ++c) {
    double r = 0;
    for (int64_t i = 0; i < p.n; ++i) r += b_rec[i * p.classes + c] * raw_dot(p, i, c);
    beta_want[c] = -double(p.w_inv[c]) * p.w_inv[c] * r;
  }
  const double beta_err = relative_error(beta_got, beta_want);
  CHECK_MSG(beta_err < 1e-6, where << ": beta error " << beta_err);
  std::vector<double> dx, dw, dx_ref, dw_ref, beta_ref(p.classes);
  for (int64_t c = 0; c < p.classes; ++c) {  // float64 projection of the reference's own E
    double r = 0;
    for (int64_t i = 0; i < p.n; ++i) {
      double dot = 0;
      for (int64_t k = 0; k < p.d; ++k) dot += double(widen(p.x_hat[i * p.d + k])) * widen(p.w[c * p.d + k]);
      r += ref.b[i * p.classes + c] * dot;
    }
    beta_ref[c] = -double(p.w_inv[c]) * p.w_inv[c] * r;
  }
  gradients(p, b_rec, beta_got, dx, dw);
  gradients(p, ref.b, beta_ref, dx_ref, dw_ref);
  CHECK_MSG(relative_error(dx, dx_ref) < 5e-3, where << ": dx^ error " << relative_error(dx, dx_ref));
  CHECK_MSG(relative_error(dw, dw_ref) < 5e-3, where << ": dW error " << relative_error(dw, dw_ref));
}

}  // namespace

// --quick: the underflow problem at one setting, where every kernel runs, the true max's shared memory
// included (the ThreadSanitizer build runs this).
int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  const Problem underflow = make_problem(true, 5);
  if (quick) {
    check_setting(underflow, kSettings[0], true);
    return unit_check::finish();
  }
  const Problem mixed = make_problem(false, 1);
  for (const Setting& st : kSettings) {
    check_setting(mixed, st, false);
    check_setting(underflow, st, true);
  }
  return unit_check::finish();
}

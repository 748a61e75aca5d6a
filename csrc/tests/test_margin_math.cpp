// Unit tests for the header-only math shared by the CPU and CUDA kernels (csrc/include/oclear):
// the margin transform psi and its derivative, negative logits with inter-class filtering, the
// online softmax state, fast_exp and the margin argument checks. No torch, no test framework:
// built by the root CMakeLists.txt and run by CTest (and python_tests/test_cpp_unit.py).
//
// Every failed check prints file:line, the expression and the values involved. Loops over grids
// aggregate into one check (the worst point) so a systematic failure prints one line, not 10^5.
// The last line is "N passed, M failed"; the exit status is non-zero when M > 0.

#include <oclear/checks.h>
#include <oclear/fast_exp.h>
#include <oclear/margin.h>
#include <oclear/online_softmax.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <iomanip>
#include <iostream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

int g_passed = 0;
int g_failed = 0;

void record(bool ok, const char* file, int line, const char* expr, const std::string& detail) {
  if (ok) {
    ++g_passed;
    return;
  }
  ++g_failed;
  std::cout << file << ":" << line << ": FAILED: " << expr;
  if (!detail.empty()) std::cout << "\n    " << detail;
  std::cout << std::endl;
}

}  // namespace

// CHECK_MSG(cond, a << b << ...): the message is only formatted on failure.
#define CHECK_MSG(cond, msg)                                        \
  do {                                                              \
    const bool ok_ = static_cast<bool>(cond);                       \
    if (ok_) {                                                      \
      record(true, __FILE__, __LINE__, #cond, std::string());       \
    } else {                                                        \
      std::ostringstream os_;                                       \
      os_ << std::setprecision(17) << msg;                          \
      record(false, __FILE__, __LINE__, #cond, os_.str());          \
    }                                                               \
  } while (0)

#define CHECK(cond) CHECK_MSG(cond, "")

// |a - b| <= tol (false for NaN).
#define CHECK_NEAR(a, b, tol, ctx)                                                             \
  do {                                                                                         \
    const double a_ = static_cast<double>(a);                                                  \
    const double b_ = static_cast<double>(b);                                                  \
    const double t_ = static_cast<double>(tol);                                                \
    CHECK_MSG(std::fabs(a_ - b_) <= t_, #a " = " << a_ << ", " #b " = " << b_ << ", |diff| = " \
                                                 << std::fabs(a_ - b_) << " > tol " << t_      \
                                                 << "  [" << ctx << "]");                      \
  } while (0)

namespace {

using oclear::MarginParams;
using oclear::kPi;

struct Margin {
  double m1, m2, m3;
};

std::ostream& operator<<(std::ostream& os, const Margin& m) {
  return os << "m1=" << m.m1 << " m2=" << m.m2 << " m3=" << m.m3;
}

MarginParams<double> params(const Margin& m, bool straight_through = false, double scale = 64.0,
                            bool has_filter = false, double filter = 0.0) {
  return oclear::make_margin_params(scale, m.m1, m.m2, m.m3, has_filter, filter, straight_through);
}

// Settings that are not purely additive (they have a boundary c* > -1).
const std::vector<Margin>& angular_margins() {
  static const std::vector<Margin> v = {
      {1.0, 0.5, 0.0},    // ArcFace
      {1.0, 0.2, 0.0},    // ArcFace, small margin
      {1.0, 1e-3, 0.0},   // ArcFace, tiny margin: c* within 5e-7 of -1
      {1.0, 3.0, 0.0},    // ArcFace, m2 near pi: c* near +1, almost all linear
      {1.35, 0.0, 0.0},   // SphereFace, non-integer
      {4.0, 0.0, 0.0},    // SphereFace (original)
      {1.0, 0.3, 0.2},    // ArcFace + CosFace (insightface combined)
      {1.2, 0.4, 0.1},    // all three
      {2.5, 0.8, 0.35},   // all three, large
  };
  return v;
}

// ------------------------------------------------------------------------------------------------
// target_cos (psi)
// ------------------------------------------------------------------------------------------------

template <typename T>
double psi(double c, const MarginParams<double>& pd) {
  const MarginParams<T> p = pd.template cast<T>();
  return static_cast<double>(oclear::target_cos(static_cast<T>(c), p));
}

template <typename T>
double dpsi(double c, const MarginParams<double>& pd) {
  const MarginParams<T> p = pd.template cast<T>();
  return static_cast<double>(oclear::target_cos_grad(static_cast<T>(c), p));
}

template <typename T>
const char* type_name() {
  return sizeof(T) == sizeof(float) ? "float" : "double";
}

void test_make_margin_params() {
  const auto cosface = params({1.0, 0.0, 0.35});
  CHECK(cosface.additive);
  CHECK(cosface.cos_boundary == -1.0);
  for (const Margin& m : angular_margins()) {
    const auto p = params(m);
    CHECK_MSG(!p.additive, m);
    CHECK_NEAR(p.cos_boundary, std::cos((kPi - m.m2) / m.m1), 0.0, m);
    CHECK_MSG(p.cos_boundary > -1.0 && p.cos_boundary < 1.0, m << " c*=" << p.cos_boundary);
  }
  // cast keeps every field.
  const auto pd = oclear::make_margin_params(30.0, 1.2, 0.4, 0.1, true, 0.25, true);
  const auto pf = pd.cast<float>();
  CHECK(pf.scale == 30.0f && pf.m1 == 1.2f && pf.m2 == 0.4f && pf.m3 == 0.1f);
  CHECK(pf.cos_boundary == static_cast<float>(pd.cos_boundary));
  CHECK(pf.has_filter && pf.filter == 0.25f && pf.straight_through && !pf.additive);
}

template <typename T>
void test_target_cos_known_values() {
  const char* tn = type_name<T>();
  const double tol = sizeof(T) == sizeof(float) ? 4e-6 : 1e-14;
  // CosFace: c - m3 exactly, over the whole range.
  for (double m3 : {0.0, 0.1, 0.35, 0.5}) {
    const auto p = params({1.0, 0.0, m3});
    const auto pt = p.template cast<T>();
    double worst = 0.0, worst_c = 0.0;
    bool exact = true;
    for (int i = 0; i <= 2000; ++i) {
      const T c = static_cast<T>(-1.0 + i * 1e-3);
      const T got = oclear::target_cos(c, pt);
      if (got != c - pt.m3) {
        exact = false;
        if (std::fabs(double(got) - double(c - pt.m3)) > worst) {
          worst = std::fabs(double(got) - double(c - pt.m3));
          worst_c = c;
        }
      }
    }
    CHECK_MSG(exact, tn << " CosFace m3=" << m3 << ": not exactly c - m3 at c=" << worst_c
                        << ", |diff|=" << worst);
  }
  // ArcFace: cos(acos(c) + m) above the boundary, the linear continuation below.
  for (double m : {0.2, 0.5, 0.8}) {
    const auto p = params({1.0, m, 0.0});
    double worst = 0.0, worst_c = 0.0;
    for (int i = 0; i <= 2000; ++i) {
      const double c = static_cast<double>(static_cast<T>(-1.0 + i * 1e-3));
      const double expect = c >= p.cos_boundary ? std::cos(std::acos(c) + m)
                                                : (c - p.cos_boundary) - 1.0;
      const double err = std::fabs(psi<T>(c, p) - expect);
      if (!(err <= worst)) {
        worst = err;
        worst_c = c;
      }
    }
    CHECK_MSG(worst <= tol, tn << " ArcFace m=" << m << ": worst |psi - cos(acos(c)+m)| = "
                               << worst << " at c=" << worst_c);
    // A few hand-picked points.
    CHECK_NEAR(psi<T>(1.0, p), std::cos(m), tol, tn << " ArcFace m=" << m << " c=1");
    CHECK_NEAR(psi<T>(0.0, p), std::cos(kPi / 2 + m), tol, tn << " ArcFace m=" << m << " c=0");
    CHECK_NEAR(psi<T>(-1.0, p), (-1.0 - p.cos_boundary) - 1.0, tol,
               tn << " ArcFace m=" << m << " c=-1 (linear)");
  }
  // SphereFace, integer m1 = 4: cos(4 acos c) is the Chebyshev polynomial 8c^4 - 8c^2 + 1 for
  // c >= c* = cos(pi/4); an independent check of the acos/cos path.
  {
    const auto p = params({4.0, 0.0, 0.0});
    CHECK_NEAR(p.cos_boundary, std::sqrt(0.5), 1e-15, "SphereFace m1=4 boundary");
    double worst = 0.0, worst_c = 0.0;
    for (int i = 0; i <= 2000; ++i) {
      const double c = static_cast<double>(static_cast<T>(-1.0 + i * 1e-3));
      const double expect = c >= p.cos_boundary ? 8 * c * c * c * c - 8 * c * c + 1
                                                : (c - p.cos_boundary) - 1.0;
      const double err = std::fabs(psi<T>(c, p) - expect);
      if (!(err <= worst)) {
        worst = err;
        worst_c = c;
      }
    }
    CHECK_MSG(worst <= (sizeof(T) == sizeof(float) ? 1e-5 : 1e-13),
              tn << " SphereFace m1=4: worst |psi - T4(c)| = " << worst << " at c=" << worst_c);
  }
  // SphereFace, non-integer m1.
  {
    const double m1 = 1.35;
    const auto p = params({m1, 0.0, 0.0});
    for (double c : {1.0, 0.9, 0.5, 0.0, -0.3}) {
      if (c < p.cos_boundary) continue;
      CHECK_NEAR(psi<T>(c, p), std::cos(m1 * std::acos(c)), tol,
                 tn << " SphereFace m1=1.35 c=" << c);
    }
    CHECK_NEAR(psi<T>(-1.0, p), (-1.0 - p.cos_boundary) - 1.0, tol, tn << " SphereFace c=-1");
  }
  // Combined: cos(m1 acos c + m2) - m3.
  for (const Margin& m : angular_margins()) {
    const auto p = params(m);
    for (double c : {1.0, 0.95, 0.7, 0.3, 0.0, -0.4, -0.8, -1.0}) {
      const double cf = static_cast<double>(static_cast<T>(c));
      const double expect = cf >= p.cos_boundary
                                ? std::cos(m.m1 * std::acos(cf) + m.m2) - m.m3
                                : (cf - p.cos_boundary) - 1.0 - m.m3;
      CHECK_NEAR(psi<T>(cf, p), expect, tol * m.m1, tn << " " << m << " c=" << cf);
    }
  }
}

template <typename T>
void test_target_cos_continuity() {
  const char* tn = type_name<T>();
  for (const Margin& m : angular_margins()) {
    const auto p = params(m);
    const T cstar = static_cast<T>(p.cos_boundary);
    double above, below;
    if (sizeof(T) == sizeof(double)) {
      above = psi<T>(p.cos_boundary + 1e-9, p);
      below = psi<T>(p.cos_boundary - 1e-9, p);
    } else {
      above = psi<T>(std::nextafter(cstar, T(1)), p);
      below = psi<T>(std::nextafter(cstar, T(-1)), p);
    }
    CHECK_NEAR(above, below, 1e-6, tn << " continuity at c*=" << p.cos_boundary << " " << m);
    // At the boundary psi = -1 - m3 from both sides.
    CHECK_NEAR(above, -1.0 - m.m3, 1e-6, tn << " psi(c*+) " << m);
    CHECK_NEAR(below, -1.0 - m.m3, 1e-6, tn << " psi(c*-) " << m);
    CHECK_NEAR(psi<T>(cstar, p), -1.0 - m.m3, 1e-6, tn << " psi(c*) " << m);
  }
}

// psi is increasing in c over [-1, 1]. Strictly in double. In float the cos branch is flat just
// above c* (psi'(c*+) = 0, increments ~1e-9 on this grid, far below one float ulp of psi ~ -1), so
// there only "never decreases by more than rounding" is checked, plus strict increase overall.
template <typename T>
void test_target_cos_monotone() {
  const char* tn = type_name<T>();
  const bool is_double = sizeof(T) == sizeof(double);
  std::vector<Margin> margins = angular_margins();
  margins.push_back({1.0, 0.0, 0.35});  // CosFace
  margins.push_back({1.0, 0.0, 0.0});   // no margin
  const int n = 200000;
  for (const Margin& m : margins) {
    const auto p = params(m);
    std::vector<double> grid;
    grid.reserve(n + 8);
    for (int i = 0; i <= n; ++i) grid.push_back(-1.0 + 2.0 * i / n);
    // Points straddling the boundary. Not closer than 1e-7 above c*: psi'(c*+) = 0, so the cos
    // branch rises only by ~(m1 d / sin theta*)^2 / 2 there, below double resolution for d ~ 1e-9.
    for (double d : {-1e-7, -1e-9, 0.0, 1e-7, 1e-6})
      if (p.cos_boundary + d >= -1.0) grid.push_back(p.cos_boundary + d);
    for (double& c : grid) c = static_cast<double>(static_cast<T>(c));
    std::sort(grid.begin(), grid.end());
    grid.erase(std::unique(grid.begin(), grid.end()), grid.end());

    double prev = psi<T>(grid[0], p);
    double worst_drop = -std::numeric_limits<double>::infinity();  // max of prev - cur
    double worst_c = grid[0];
    bool finite = std::isfinite(prev);
    for (size_t i = 1; i < grid.size(); ++i) {
      const double cur = psi<T>(grid[i], p);
      finite = finite && std::isfinite(cur);
      if (prev - cur > worst_drop) {
        worst_drop = prev - cur;
        worst_c = grid[i];
      }
      prev = cur;
    }
    CHECK_MSG(finite, tn << " psi not finite somewhere on the grid, " << m);
    if (is_double) {
      CHECK_MSG(worst_drop < 0.0, tn << " psi not strictly increasing: psi(c_prev) - psi(c) = "
                                     << worst_drop << " at c=" << worst_c << ", " << m);
    } else {
      CHECK_MSG(worst_drop <= 2.5e-7, tn << " psi decreases by " << worst_drop << " at c="
                                         << worst_c << ", " << m);
    }
    CHECK_MSG(psi<T>(-1.0, p) < psi<T>(p.cos_boundary, p) || p.cos_boundary == -1.0,
              tn << " " << m);
    CHECK_MSG(psi<T>(p.cos_boundary, p) < psi<T>(1.0, p), tn << " " << m);
  }
}

// ------------------------------------------------------------------------------------------------
// target_cos_grad
// ------------------------------------------------------------------------------------------------

void test_target_cos_grad_finite_difference() {
  const double h = 1e-6;
  for (const Margin& m : angular_margins()) {
    const auto p = params(m);
    double worst = 0.0, worst_c = 0.0, worst_g = 0.0, worst_fd = 0.0;
    int n_points = 0;
    for (int i = 0; i <= 1980; ++i) {
      const double c = -0.99 + i * 1e-3;
      if (std::fabs(c - p.cos_boundary) < 1e-3) continue;
      const double g = dpsi<double>(c, p);
      const double fd = (psi<double>(c + h, p) - psi<double>(c - h, p)) / (2 * h);
      const double err = std::fabs(g - fd) / std::max(1.0, std::fabs(fd));
      ++n_points;
      if (!(err <= worst)) {
        worst = err;
        worst_c = c;
        worst_g = g;
        worst_fd = fd;
      }
    }
    CHECK_MSG(n_points > 1900, m);
    CHECK_MSG(worst <= 1e-6, m << ": worst relative |psi' - FD| = " << worst << " at c=" << worst_c
                               << " (psi'=" << worst_g << ", FD=" << worst_fd << ")");
  }
}

template <typename T>
void test_target_cos_grad_float_matches_double() {
  // The float derivative tracks the double one (same formula), away from c = +-1 where sin(theta)
  // loses its relative precision in float.
  const char* tn = type_name<T>();
  for (const Margin& m : angular_margins()) {
    const auto p = params(m);
    double worst = 0.0, worst_c = 0.0;
    for (int i = 0; i <= 1980; ++i) {
      const double c = static_cast<double>(static_cast<T>(-0.99 + i * 1e-3));
      if (std::fabs(c - p.cos_boundary) < 1e-3) continue;
      const double gd = dpsi<double>(c, p);
      const double gt = dpsi<T>(c, p);
      const double err = std::fabs(gt - gd) / std::max(1.0, std::fabs(gd));
      if (!(err <= worst)) {
        worst = err;
        worst_c = c;
      }
    }
    CHECK_MSG(worst <= 2e-5, tn << " " << m << ": worst relative |psi'_T - psi'_double| = "
                                << worst << " at c=" << worst_c);
  }
}

template <typename T>
void test_target_cos_grad_special() {
  const char* tn = type_name<T>();
  // Straight-through and CosFace: exactly 1 everywhere.
  std::vector<Margin> margins = angular_margins();
  margins.push_back({1.0, 0.0, 0.35});
  for (const Margin& m : margins) {
    const auto p_st = params(m, /*straight_through=*/true);
    bool all_one = true;
    double bad_c = 0.0, bad_g = 0.0;
    for (int i = 0; i <= 2000; ++i) {
      const double c = -1.0 + i * 1e-3;
      const double g = dpsi<T>(c, p_st);
      if (g != 1.0 && all_one) {
        all_one = false;
        bad_c = c;
        bad_g = g;
      }
    }
    CHECK_MSG(all_one, tn << " straight_through psi' = " << bad_g << " != 1 at c=" << bad_c
                          << ", " << m);
  }
  for (double m3 : {0.0, 0.35}) {
    const auto p = params({1.0, 0.0, m3});
    for (double c : {-1.0, -0.5, 0.0, 0.5, 1.0}) {
      CHECK_MSG(dpsi<T>(c, p) == 1.0, tn << " CosFace psi'(" << c << ") = " << dpsi<T>(c, p));
    }
  }
  // Finite (and >= 0, and within the documented bound m1 / kSinThetaFloor) at exactly c = +-1.
  for (const Margin& m : angular_margins()) {
    const auto p = params(m);
    for (double c : {1.0, -1.0}) {
      const double g = dpsi<T>(c, p);
      CHECK_MSG(std::isfinite(g) && g >= 0.0 && g <= m.m1 / oclear::kSinThetaFloor + 1e-6,
                tn << " psi'(" << c << ") = " << g << ", " << m);
    }
    // c = -1 lies below c* for every non-additive setting: the linear continuation, slope 1.
    CHECK_MSG(dpsi<T>(-1.0, p) == 1.0, tn << " psi'(-1) = " << dpsi<T>(-1.0, p) << ", " << m);
    // Also one ulp inside the interval.
    for (T c : {std::nextafter(T(1), T(0)), std::nextafter(T(-1), T(0))}) {
      const double g = dpsi<T>(c, p);
      CHECK_MSG(std::isfinite(g) && g >= 0.0, tn << " psi'(" << double(c) << ") = " << g << ", "
                                                 << m);
    }
  }
  // With m2 = 0 the derivative at c = 1 is its finite limit m1^2, and it is continuous there: the
  // value one ulp below 1 agrees (no collapse to 0 under the sin(theta) floor).
  for (double m1 : {1.35, 2.0, 4.0}) {
    const auto p = params({m1, 0.0, 0.0});
    CHECK_MSG(std::abs(dpsi<T>(1.0, p) - m1 * m1) < 1e-5 * m1 * m1,
              tn << " SphereFace psi'(1) = " << dpsi<T>(1.0, p) << ", want m1^2 = " << m1 * m1);
    const double near = dpsi<T>(double(std::nextafter(T(1), T(0))), p);
    CHECK_MSG(std::abs(near - m1 * m1) < 1e-3 * m1 * m1,
              tn << " SphereFace psi'(1 - ulp) = " << near << ", want about " << m1 * m1);
  }
  // psi' >= 0 on the whole range (psi is increasing); tiny negative rounding allowed in float.
  for (const Margin& m : angular_margins()) {
    const auto p = params(m);
    double worst = std::numeric_limits<double>::infinity(), worst_c = 0.0;
    for (int i = 0; i <= 20000; ++i) {
      const double c = -1.0 + i * 1e-4;
      const double g = dpsi<T>(c, p);
      if (!(g >= worst)) {
        worst = g;
        worst_c = c;
      }
    }
    CHECK_MSG(worst >= (sizeof(T) == sizeof(float) ? -1e-4 : 0.0),
              tn << " min psi' = " << worst << " at c=" << worst_c << ", " << m);
  }
}

// ------------------------------------------------------------------------------------------------
// negative_logit / negative_logit_grad
// ------------------------------------------------------------------------------------------------

template <typename T>
void test_negative_logit() {
  const char* tn = type_name<T>();
  const double scale = 32.0;
  const auto p_off = params({1.0, 0.5, 0.0}, false, scale).template cast<T>();
  for (double cd : {-1.0, -0.3, 0.0, 0.2, 0.7, 1.0}) {
    const T c = static_cast<T>(cd);
    CHECK_MSG(oclear::negative_logit(c, p_off) == T(scale) * c,
              tn << " no filter: logit(" << cd << ") = " << oclear::negative_logit(c, p_off));
    CHECK_MSG(oclear::negative_logit_grad(c, p_off) == T(scale),
              tn << " no filter: grad(" << cd << ") = " << oclear::negative_logit_grad(c, p_off));
  }
  for (double filter : {-0.5, 0.0, 0.3, 1.0}) {
    const auto p = params({1.0, 0.5, 0.0}, false, scale, /*has_filter=*/true, filter)
                       .template cast<T>();
    const T f = static_cast<T>(filter);
    for (double cd : {-1.0, -0.6, -0.5, -0.2, 0.0, 0.1, 0.3, 0.31, 0.9, 1.0}) {
      const T c = static_cast<T>(cd);
      const bool filtered = c > f;  // strictly above the threshold
      const T expect_logit = filtered ? T(0) : T(scale) * c;
      const T expect_grad = filtered ? T(0) : T(scale);
      CHECK_MSG(oclear::negative_logit(c, p) == expect_logit,
                tn << " filter=" << filter << ": logit(" << cd << ") = "
                   << oclear::negative_logit(c, p) << ", expected " << expect_logit);
      CHECK_MSG(oclear::negative_logit_grad(c, p) == expect_grad,
                tn << " filter=" << filter << ": grad(" << cd << ") = "
                   << oclear::negative_logit_grad(c, p) << ", expected " << expect_grad);
    }
    // Exactly at the threshold: not filtered; one ulp above: filtered.
    CHECK(oclear::negative_logit(f, p) == T(scale) * f);
    if (f < T(1)) {
      const T above = std::nextafter(f, T(2));
      CHECK(oclear::negative_logit(above, p) == T(0));
      CHECK(oclear::negative_logit_grad(above, p) == T(0));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// SoftmaxState
// ------------------------------------------------------------------------------------------------

template <typename T>
double direct_lse(const std::vector<T>& z) {
  if (z.empty()) return -std::numeric_limits<double>::infinity();
  long double m = -std::numeric_limits<long double>::infinity();
  for (T v : z) m = std::max<long double>(m, v);
  long double s = 0;
  for (T v : z) s += std::exp(static_cast<long double>(v) - m);
  return static_cast<double>(m + std::log(s));
}

template <typename T>
oclear::SoftmaxState<T> state_of(const std::vector<T>& z) {
  // A partial state computed directly (how a kernel tile computes it).
  if (z.empty()) return oclear::SoftmaxState<T>::empty();
  T m = z[0];
  for (T v : z) m = std::max(m, v);
  T s = 0;
  for (T v : z) s += std::exp(v - m);
  return oclear::SoftmaxState<T>{m, s};
}

template <typename T>
void test_softmax_state() {
  const char* tn = type_name<T>();
  const bool is_double = sizeof(T) == sizeof(double);
  const double rtol = is_double ? 1e-12 : 2e-6;
  using S = oclear::SoftmaxState<T>;

  // Empty state.
  const S e = S::empty();
  CHECK_MSG(std::isinf(e.log_sum_exp()) && e.log_sum_exp() < 0,
            tn << " empty log_sum_exp = " << e.log_sum_exp());
  {
    S a{T(3), T(2.5)};
    a.merge(S::empty());
    CHECK_MSG(a.max == T(3) && a.sum == T(2.5), tn << " merging empty changed (" << a.max << ", "
                                                   << a.sum << ")");
    S b = S::empty();
    b.merge(S{T(3), T(2.5)});
    CHECK_MSG(b.max == T(3) && b.sum == T(2.5), tn << " empty.merge(x) = (" << b.max << ", "
                                                   << b.sum << ")");
    S c = S::empty();
    c.merge(S::empty());
    CHECK_MSG(std::isinf(c.log_sum_exp()) && c.log_sum_exp() < 0 && c.sum == T(0),
              tn << " empty+empty lse = " << c.log_sum_exp());
    // Merging a single logit z as (z, 1).
    S d = S::empty();
    d.merge(T(-1e4), T(1));
    d.merge(T(1e4), T(1));
    CHECK_NEAR(d.log_sum_exp(), 1e4, 1e4 * rtol, tn << " lse(-1e4, 1e4)");
    S f = S::empty();
    f.merge(T(0), T(1));
    f.merge(T(0), T(1));
    CHECK_NEAR(f.log_sum_exp(), std::log(2.0), rtol, tn << " lse(0, 0)");
  }

  std::mt19937_64 rng(20240607);
  std::uniform_real_distribution<double> unif(-30.0, 30.0);
  std::uniform_int_distribution<int> coin(0, 9);
  double worst = 0.0;
  int worst_trial = -1;
  double worst_got = 0.0, worst_ref = 0.0;
  bool noop_ok = true;
  for (int trial = 0; trial < 300; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 200);
    std::vector<T> z(n);
    for (T& v : z) {
      const int k = coin(rng);
      v = static_cast<T>(k == 0 ? 1e4 : k == 1 ? -1e4 : unif(rng));
    }
    // Occasionally shift everything far up or down.
    if (trial % 7 == 3)
      for (T& v : z) v += static_cast<T>(5e3);
    if (trial % 7 == 5)
      for (T& v : z) v -= static_cast<T>(3e4);
    const double ref = direct_lse(z);

    // Random partition into parts (some empty), in random order.
    const int parts = 1 + static_cast<int>(rng() % 8);
    std::vector<std::vector<T>> split(parts + 1);  // the extra part stays empty
    for (T v : z) split[rng() % parts].push_back(v);
    std::shuffle(split.begin(), split.end(), rng);

    S merged = S::empty();
    for (const auto& part : split) {
      S before = merged;
      const S s = state_of(part);
      merged.merge(s);
      if (part.empty() && !(merged.max == before.max && merged.sum == before.sum)) noop_ok = false;
    }
    // Also element by element, as a streaming kernel would.
    S streamed = S::empty();
    for (T v : z) streamed.merge(v, T(1));
    S pushed = S::empty();  // push(z): the one-exp streaming update of the CUDA epilogues
    for (T v : z) pushed.push(v);

    for (double got : {static_cast<double>(merged.log_sum_exp()),
                       static_cast<double>(streamed.log_sum_exp()),
                       static_cast<double>(pushed.log_sum_exp())}) {
      const double err = std::fabs(got - ref) / std::max(1.0, std::fabs(ref));
      if (!(err <= worst)) {
        worst = err;
        worst_trial = trial;
        worst_got = got;
        worst_ref = ref;
      }
    }
  }
  CHECK_MSG(worst <= rtol, tn << " merged lse vs direct: worst relative error " << worst
                              << " (trial " << worst_trial << ": got " << worst_got << ", ref "
                              << worst_ref << ")");
  CHECK_MSG(noop_ok, tn << " merging an empty partial state changed the state");
}

// ------------------------------------------------------------------------------------------------
// fast_exp
// ------------------------------------------------------------------------------------------------

void test_fast_exp() {
  double worst = 0.0, worst_x = 0.0;
  int n = 0;
  auto probe = [&](float x) {
    const double ref = std::exp(static_cast<double>(x));
    const float got = oclear::fast_exp(x);
    const double err = std::fabs(static_cast<double>(got) - ref) / ref;
    ++n;
    if (!(err <= worst)) {
      worst = err;
      worst_x = x;
    }
  };
  for (int i = 0; i <= 870000; ++i) probe(static_cast<float>(-87.0 + i * 1e-4));
  for (float x : {-87.0f, -86.99999f, -50.5f, -1e-6f, -1e-30f, 0.0f, -0.0f}) probe(x);
  for (float x : {1e-7f, 0.5f, 0.6931472f, 1.0f, 2.0f, 10.0f, 20.0f, 40.0f, 64.0f, 79.9f, 80.0f})
    probe(x);
  CHECK_MSG(worst < 4e-7, "fast_exp worst relative error " << worst << " at x=" << worst_x
                                                           << " over " << n << " points");
  CHECK(oclear::fast_exp(0.0f) == 1.0f);

  for (float x : {-87.5f, -100.0f, -1000.0f, -1e30f, -std::numeric_limits<float>::infinity(),
                  -std::numeric_limits<float>::max()}) {
    const float r = oclear::fast_exp(x);
    CHECK_MSG(std::isfinite(r) && r >= 0.0f && std::fpclassify(r) != FP_SUBNORMAL && r < 1e-37f,
              "fast_exp(" << x << ") = " << r);
  }
}

// ------------------------------------------------------------------------------------------------
// margin_settings_error
// ------------------------------------------------------------------------------------------------

void test_margin_settings_error() {
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  struct Valid {
    double scale, m1, m2, m3;
    bool has_filter;
    double filter;
  };
  for (const Valid& v : std::vector<Valid>{{64, 1, 0.5, 0, false, 0},
                                           {30, 1, 0, 0.35, false, 0},
                                           {64, 4, 0, 0, false, 0},
                                           {64, 1.2, 0.4, 0.1, true, 0.2},
                                           {1e-3, 1, 0, 0, true, -1.0},
                                           {64, 1, 3.14, 0, true, 1.0},
                                           {64, 1, 0, 0, false, nan},   // filter ignored when off
                                           {64, 1, 0, 0, false, 5.0}}) {
    const std::string err =
        oclear::margin_settings_error(v.scale, v.m1, v.m2, v.m3, v.has_filter, v.filter);
    CHECK_MSG(err.empty(), "valid settings scale=" << v.scale << " m1=" << v.m1 << " m2=" << v.m2
                                                   << " m3=" << v.m3 << " filter=" << v.filter
                                                   << " rejected: " << err);
  }
  struct Invalid {
    double scale, m1, m2, m3;
    bool has_filter;
    double filter;
    const char* name;
  };
  for (const Invalid& v : std::vector<Invalid>{
           {0.0, 1, 0.5, 0, false, 0, "scale"},
           {-1.0, 1, 0.5, 0, false, 0, "scale"},
           {inf, 1, 0.5, 0, false, 0, "scale"},
           {nan, 1, 0.5, 0, false, 0, "scale"},
           {64, 0.5, 0.5, 0, false, 0, "m1"},
           {64, 0.999, 0, 0, false, 0, "m1"},
           {64, nan, 0, 0, false, 0, "m1"},
           {64, inf, 0, 0, false, 0, "m1"},
           {64, 1, -0.1, 0, false, 0, "m2"},
           {64, 1, kPi, 0, false, 0, "m2"},
           {64, 1, 4.0, 0, false, 0, "m2"},
           {64, 1, nan, 0, false, 0, "m2"},
           {64, 1, 0.5, -0.1, false, 0, "m3"},
           {64, 1, 0.5, nan, false, 0, "m3"},
           {64, 1, 0.5, inf, false, 0, "m3"},
           {64, 1, 0.5, 0, true, 1.5, "interclass_filter"},
           {64, 1, 0.5, 0, true, -1.01, "interclass_filter"},
           {64, 1, 0.5, 0, true, nan, "interclass_filter"},
       }) {
    const std::string err =
        oclear::margin_settings_error(v.scale, v.m1, v.m2, v.m3, v.has_filter, v.filter);
    CHECK_MSG(!err.empty() && err.find(v.name) != std::string::npos,
              "invalid " << v.name << " (scale=" << v.scale << " m1=" << v.m1 << " m2=" << v.m2
                         << " m3=" << v.m3 << " filter=" << v.filter << "): message \"" << err
                         << "\"");
  }
}

}  // namespace

int main() {
  test_make_margin_params();

  test_target_cos_known_values<double>();
  test_target_cos_known_values<float>();
  test_target_cos_continuity<double>();
  test_target_cos_continuity<float>();
  test_target_cos_monotone<double>();
  test_target_cos_monotone<float>();

  test_target_cos_grad_finite_difference();
  test_target_cos_grad_float_matches_double<float>();
  test_target_cos_grad_special<double>();
  test_target_cos_grad_special<float>();

  test_negative_logit<double>();
  test_negative_logit<float>();

  test_softmax_state<double>();
  test_softmax_state<float>();

  test_fast_exp();
  test_margin_settings_error();

  std::cout << g_passed << " passed, " << g_failed << " failed" << std::endl;
  return g_failed == 0 ? 0 : 1;
}

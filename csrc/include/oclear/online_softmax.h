// Online softmax state (running max m, running sum-exp s = sum_c exp(z_c - m)), shared by the CPU
// and CUDA kernels. Two partial states over disjoint class sets merge exactly:
//   m = max(m1, m2),  s = s1 * exp(m1 - m) + s2 * exp(m2 - m)
// An empty state is (-inf, 0); merging it is a no-op (guarded: exp(-inf - -inf) would be NaN).
#pragma once

#include <cmath>

#include "margin.h"  // OCLEAR_HD

namespace oclear {

OCLEAR_HD float exp_(float x) { return expf(x); }
OCLEAR_HD double exp_(double x) { return exp(x); }
OCLEAR_HD float log_(float x) { return logf(x); }
OCLEAR_HD double log_(double x) { return log(x); }

template <typename T>
struct SoftmaxState {
  T max;
  T sum;

  OCLEAR_HD static SoftmaxState empty() {
    return SoftmaxState{T(-INFINITY), T(0)};  // INFINITY: usable in device code
  }

  OCLEAR_HD void merge(T other_max, T other_sum) {
    if (other_sum == T(0)) return;
    if (sum == T(0)) {
      max = other_max;
      sum = other_sum;
      return;
    }
    const T m = max > other_max ? max : other_max;
    sum = sum * exp_(max - m) + other_sum * exp_(other_max - m);
    max = m;
  }

  OCLEAR_HD void merge(const SoftmaxState& other) { merge(other.max, other.sum); }

  // Adds one logit z: one exp per element (of the smaller minus the larger), for kernels that
  // stream a row element by element (CUDA epilogues). Same as merge(z, 1) without the second exp;
  // a NaN z makes the sum NaN, as it should.
  OCLEAR_HD void push(T z) {
    if (z > max) {
      sum = sum * exp_(max - z) + T(1);  // exp(-inf) = 0 for the empty state
      max = z;
    } else {
      sum += exp_(z - max);
    }
  }

  // log sum_c exp(z_c); -inf for an empty state.
  OCLEAR_HD T log_sum_exp() const { return max + log_(sum); }
};

}  // namespace oclear

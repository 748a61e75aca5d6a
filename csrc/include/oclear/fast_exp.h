// exp(x) for float on the CPU, written so that compilers vectorise it inside plain loops (no libm call, no
// branches): the CPU epilogues evaluate N x C of these per pass, and a scalar libm expf would cost
// as much as the GEMM itself. Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, then a degree-6
// Taylor polynomial (truncation error r^7/7! < 1.3e-7 relative, about 1 ulp) and a 2^n scale
// through the exponent bits. Inputs below -87.3 (the float normal range) return 0-ish tiny values,
// never denormals or NaN; the kernels only call it on z - max <= 0.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>


namespace oclear {

inline float fast_exp(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;      // high bits of ln 2, exact in float
  constexpr float kLn2Lo = 1.428606765330187e-06f;  // ln 2 - kLn2Hi
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::floor(x * kLog2e + 0.5f);  // round to nearest
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

}  // namespace oclear

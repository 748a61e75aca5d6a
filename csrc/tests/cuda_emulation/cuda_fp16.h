// Emulation stub (see cuda_emulation.h): IEEE half storage through the compiler's _Float16.
#pragma once
#include "cuda_emulation.h"

struct __half {
  _Float16 value;
};

inline float __half2float(__half h) { return static_cast<float>(h.value); }
inline __half __float2half(float f) { return {static_cast<_Float16>(f)}; }

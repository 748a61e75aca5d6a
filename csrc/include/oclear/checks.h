// Argument rules shared by every backend, as plain predicates and messages (no torch headers, so
// CUDA host code and the C++ unit tests can use them). The torch glue turns a failed rule into an
// exception that names the op and the argument.
#pragma once

#include <cmath>
#include <sstream>
#include <string>

#include "margin.h"

namespace oclear {

// Empty string when the margin settings are valid, else what is wrong.
inline std::string margin_settings_error(double scale, double m1, double m2, double m3,
                                         bool has_filter, double filter) {
  std::ostringstream err;
  if (!std::isfinite(scale) || scale <= 0.0) {
    err << "scale must be a finite number > 0, got " << scale;
  } else if (!std::isfinite(m1) || m1 < 1.0) {
    err << "margin m1 (multiplicative angular, SphereFace) must be finite and >= 1, got " << m1;
  } else if (!std::isfinite(m2) || m2 < 0.0 || m2 >= kPi) {
    err << "margin m2 (additive angular, ArcFace) must be in [0, pi), got " << m2;
  } else if (!std::isfinite(m3) || m3 < 0.0) {
    err << "margin m3 (additive cosine, CosFace) must be finite and >= 0, got " << m3;
  } else if (has_filter && (!std::isfinite(filter) || filter < -1.0 || filter > 1.0)) {
    err << "interclass_filter must be a cosine threshold in [-1, 1] or None, got " << filter;
  }
  return err.str();
}

}  // namespace oclear

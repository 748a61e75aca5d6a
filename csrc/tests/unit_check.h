// The C++ unit tests' checks: CHECK_MSG(cond, a << b) counts a pass or prints "file:line: FAILED: cond: a b"
// (the message is formatted only on failure); finish() prints "N passed, M failed" and gives the exit status.
#pragma once

#include <iomanip>
#include <iostream>
#include <sstream>
#include <string>

namespace unit_check {

inline int passed = 0;
inline int failed = 0;

inline void record(bool ok, const char* file, int line, const std::string& detail) {
  if (ok) {
    ++passed;
    return;
  }
  ++failed;
  std::cout << file << ":" << line << ": FAILED: " << detail << std::endl;
}

inline int finish() {
  std::cout << passed << " passed, " << failed << " failed" << std::endl;
  return failed == 0 ? 0 : 1;
}

}  // namespace unit_check

#define CHECK_MSG(cond, msg)                                          \
  do {                                                                \
    if (cond) {                                                       \
      unit_check::record(true, __FILE__, __LINE__, "");               \
    } else {                                                          \
      std::ostringstream os_;                                         \
      os_ << std::setprecision(17) << #cond << ": " << msg;           \
      unit_check::record(false, __FILE__, __LINE__, os_.str());       \
    }                                                                 \
  } while (0)

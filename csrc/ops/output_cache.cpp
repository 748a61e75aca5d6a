// Schemas of the CPU output cache's controls (oclear_ext/cpu_output_cache.py wraps them).
#include <torch/library.h>

#include <vector>

#include "../cpu/output_cache.h"

namespace oclear {
namespace {

std::vector<int64_t> cpu_output_cache_stats() {
  const cpu::OutputCacheStats s = cpu::output_cache_stats();
  return {s.cached_bytes, s.limit_bytes, s.hits, s.misses};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(oclear, m) {
  m.def("cpu_output_cache_stats() -> int[]", &cpu_output_cache_stats);
  m.def("cpu_output_cache_empty() -> ()", &cpu::output_cache_empty);
  m.def("cpu_output_cache_set_limit(int bytes) -> ()", &cpu::output_cache_set_limit);
}

}  // namespace oclear

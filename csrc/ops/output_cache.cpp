// Schemas of the CPU output cache's controls (oclear_ext/cpu_output_cache.py wraps them). A leading
// underscore: they are introspection and tuning hooks behind that module, not API of their own.
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
  m.def("_cpu_output_cache_stats() -> int[]", &cpu_output_cache_stats);
  m.def("_cpu_output_cache_empty() -> ()", &cpu::output_cache_empty);
  m.def("_cpu_output_cache_set_limit(int bytes) -> ()", &cpu::output_cache_set_limit);
}

}  // namespace oclear

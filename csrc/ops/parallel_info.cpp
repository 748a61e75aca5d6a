// How many threads the extension's at::parallel_for really uses. at::parallel_for is header code: an
// extension compiled without -fopenmp gets its serial fallback and silently runs every CPU kernel on
// one thread whatever torch.set_num_threads says. Tests and benchmarks check this (a leading underscore:
// an introspection op, not API).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace oclear {
namespace {

int64_t parallel_threads_used(int64_t items) {
  TORCH_CHECK(items >= 1, "_parallel_threads_used: items must be >= 1, got ", items);
  std::vector<int> thread_of(items, -1);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) thread_of[i] = at::get_thread_num();
  });
  std::sort(thread_of.begin(), thread_of.end());
  return std::unique(thread_of.begin(), thread_of.end()) - thread_of.begin();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(oclear, m) { m.def("_parallel_threads_used(int items) -> int", &parallel_threads_used); }

}  // namespace oclear

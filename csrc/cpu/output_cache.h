// A bounded cache of the large blocks behind the CPU ops' outputs (see output_cache.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace oclear::cpu {

// A fresh contiguous CPU tensor (uninitialised, like at::empty). With the cache on (limit > 0) and a
// block of 1 MiB or more, its storage comes from the output cache (resizable, freed back into the
// cache); otherwise it is at::empty's, from torch's CPU allocator. The cache is off by default.
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype);

// Whether t's storage is a block the cache handed out again (its pages are mapped already, so
// writes to it never fault; a fresh block's first writes do).
bool output_block_reused(const at::Tensor& t);

struct OutputCacheStats {
  int64_t cached_bytes;  // held by the cache, free for reuse
  int64_t limit_bytes;   // the most it holds
  int64_t hits;          // large allocations served from the cache
  int64_t misses;        // large allocations that went to the system
};

OutputCacheStats output_cache_stats();
// Frees every cached block and forgets how long blocks waited for reuse (see the eviction rule).
void output_cache_empty();
// Sets the limit (bytes, >= 0; 0, the default, turns caching off) and frees cached blocks above it.
void output_cache_set_limit(int64_t bytes);

}  // namespace oclear::cpu

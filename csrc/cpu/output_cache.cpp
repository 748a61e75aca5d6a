// The CPU output cache: large output blocks go back to a bounded free list instead of the system.
//
// Why: glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
// mapping and unmaps it on free, so each large output of every training step is faulted in again,
// page by page. On a 2-core VM that costs ~22-30 ms per 128 MiB (kernel page allocation, memory
// cgroup charge, zeroing), measured: at the concept-attention benchmark shape it was ~40% of the
// op's forward+backward time, more than the arithmetic. The CUDA caching allocator exists for the
// same reason. A request takes the smallest cached block that fits and is less than twice its size
// (a training step asks for the same sizes every time; varying ones still find a block); the cache
// holds at most `limit` bytes (OCLEAR_CPU_OUTPUT_CACHE_MIB, default 1024; 0 turns
// it off) and oclear_ext.cpu_output_cache.empty() gives everything back.
//
// Eviction. A freed block that does not fit under the limit may evict *stale* blocks, oldest first:
// blocks that have sat through more large requests than twice the longest wait after which any block
// was ever taken again, plus kStaleSlack. In a steady loop every cached block is taken again within
// one step's requests, so nothing is stale; a step whose outputs exceed the limit then keeps the same
// blocks every step, its largest ones (a freed block evicts smaller ones when that caches more bytes;
// the surplus goes back to the system). Evicting by age alone would let each free evict the block the
// next request needs, and miss every time in some loops. After a change of shapes
// the old sizes go stale within a few steps and make way for the new ones, where keeping them forever
// left later shapes on fresh pages (measured, 1024 x 32 x 256 shared-memory attention after larger
// per-batch shapes: 330 ms with the old blocks kept, 251 ms as with a clean cache).
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace oclear::cpu {
namespace {

// Below this glibc's heap reuses freed memory by itself (no fresh pages in steady state).
constexpr size_t kMinCachedBytes = size_t{1} << 20;
constexpr int64_t kDefaultLimitMib = 1024;
// A block is stale after more than 2 x (the longest wait of any reused block) + kStaleSlack requests.
constexpr uint64_t kStaleSlack = 8;

int64_t limit_from_environment() {
  const char* text = std::getenv("OCLEAR_CPU_OUTPUT_CACHE_MIB");
  if (text == nullptr || *text == '\0') return kDefaultLimitMib << 20;
  char* end = nullptr;
  const long long mib = std::strtoll(text, &end, 10);
  TORCH_CHECK_VALUE(end != text && *end == '\0' && mib >= 0 && mib <= (INT64_MAX >> 20),
                    "OCLEAR_CPU_OUTPUT_CACHE_MIB must be a whole number of MiB >= 0, got '", text, "'");
  return static_cast<int64_t>(mib) << 20;
}

class OutputCache final : public c10::Allocator {
 public:
  OutputCache() : limit_(limit_from_environment()) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinCachedBytes) return wrap(c10::alloc_cpu(n));
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++requests_;
      // The smallest cached block that fits, if it wastes less than half of itself.
      auto it = free_.lower_bound(n);
      if (it != free_.end() && it->first < 2 * n) {
        void* ptr = it->second.ptr;
        longest_reuse_wait_ = std::max(longest_reuse_wait_, requests_ - it->second.cached_at);
        live_[ptr] = Block{it->first, true};
        cached_ -= static_cast<int64_t>(it->first);
        free_.erase(it);
        ++hits_;
        return wrap(ptr);
      }
      ++misses_;
    }
    void* ptr = c10::alloc_cpu(n);  // outside the lock: a fresh mapping
    std::lock_guard<std::mutex> lock(mutex_);
    live_[ptr] = Block{n, false};
    return wrap(ptr);
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  bool reused(const void* ptr) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = live_.find(const_cast<void*>(ptr));
    return it != live_.end() && it->second.reused;
  }

  OutputCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_, limit_, hits_, misses_};
  }

  void set_limit(int64_t bytes) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = bytes;
      evict_oldest_until(limit_, evicted);
    }
    for (void* p : evicted) c10::free_cpu(p);
  }

  // Frees every cached block and forgets how long blocks waited for reuse.
  void empty() {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evict_oldest_until(0, evicted);
      longest_reuse_wait_ = 0;
    }
    for (void* p : evicted) c10::free_cpu(p);
  }

  static OutputCache& instance() {
    // Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
    static OutputCache* cache = new OutputCache();
    return *cache;
  }

 private:
  static void release(void* ptr) { instance().give_back(ptr); }
  static c10::DataPtr wrap(void* ptr) { return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)}; }

  void give_back(void* ptr) {
    std::vector<void*> evicted;
    bool cached = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = live_.find(ptr);
      if (it != live_.end()) {
        const auto n = static_cast<int64_t>(it->second.bytes);
        live_.erase(it);
        if (n <= limit_ && make_room(n, evicted)) {
          free_.emplace(static_cast<size_t>(n), FreeBlock{ptr, requests_, ++returned_});
          cached_ += n;
          cached = true;
        }
      }
    }
    for (void* p : evicted) c10::free_cpu(p);
    if (!cached) c10::free_cpu(ptr);  // small, larger than the limit, or no room worth making
  }

  // Makes room for a freed block of n <= limit bytes, if it can: first stale blocks go, oldest first;
  // if that is not enough, smaller blocks, largest first, but only when the cache then holds more bytes
  // than before (each cached byte is a page fault saved per step, so a step larger than the limit keeps
  // its largest blocks; equal trades are refused, so two blocks freed in turn never evict each other).
  bool make_room(int64_t n, std::vector<void*>& evicted) {
    evict_oldest_until(limit_ - n, evicted, /*stale_only=*/true);
    if (cached_ + n <= limit_) return true;
    std::vector<std::multimap<size_t, FreeBlock>::iterator> smaller;
    int64_t freed = 0;
    for (auto it = free_.lower_bound(static_cast<size_t>(n)); it != free_.begin() && cached_ - freed + n > limit_;) {
      --it;
      smaller.push_back(it);
      freed += static_cast<int64_t>(it->first);
    }
    if (cached_ - freed + n > limit_ || freed >= n) return false;
    for (auto it : smaller) {
      evicted.push_back(it->second.ptr);
      free_.erase(it);
    }
    cached_ -= freed;
    return true;
  }

  // Evicts the blocks cached longest ago (only stale ones if stale_only) until at most `bytes` are
  // cached. Linear scans: a step's outputs are a handful of blocks (at most limit / 1 MiB).
  void evict_oldest_until(int64_t bytes, std::vector<void*>& evicted, bool stale_only = false) {
    while (cached_ > bytes) {
      auto oldest = free_.begin();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->second.order < oldest->second.order) oldest = it;
      }
      if (stale_only && requests_ - oldest->second.cached_at <= 2 * longest_reuse_wait_ + kStaleSlack) return;
      cached_ -= static_cast<int64_t>(oldest->first);
      evicted.push_back(oldest->second.ptr);
      free_.erase(oldest);
    }
  }

  struct Block {
    size_t bytes;
    bool reused;  // came from the free list: its pages are mapped already
  };
  struct FreeBlock {
    void* ptr;
    uint64_t cached_at;  // requests_ when it was cached (its wait is counted from there)
    uint64_t order;      // returned_ when it was cached (which of the blocks freed together is older)
  };
  std::mutex mutex_;
  std::multimap<size_t, FreeBlock> free_;        // size -> cached block
  std::unordered_map<void*, Block> live_;        // large blocks handed out
  int64_t cached_ = 0, limit_, hits_ = 0, misses_ = 0;
  uint64_t requests_ = 0;             // large allocations so far
  uint64_t returned_ = 0;             // blocks cached so far
  uint64_t longest_reuse_wait_ = 0;   // most requests a cached block sat through before it was taken
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &OutputCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, at::MemoryFormat::Contiguous);
}

bool output_block_reused(const at::Tensor& t) {
  return t.defined() && t.is_cpu() && t.storage_offset() == 0 && OutputCache::instance().reused(t.storage().data());
}

OutputCacheStats output_cache_stats() { return OutputCache::instance().stats(); }

void output_cache_empty() { OutputCache::instance().empty(); }

void output_cache_set_limit(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes >= 0, "cpu output cache: the limit must be >= 0 bytes, got ", bytes);
  OutputCache::instance().set_limit(bytes);
}

}  // namespace oclear::cpu

// The CPU output cache: large output blocks go back to a bounded free list instead of the system.
//
// Opt-in, off by default (limit 0): which allocator a process uses is the application's choice, not a
// kernel library's. With the cache off the op's outputs are plain at::empty tensors from torch's CPU
// allocator, like every other op's, so a benchmark compares like with like and torch's memory tools
// see them. A process that wants the cache turns it on with oclear_ext.cpu_output_cache.set_limit(bytes)
// or the context manager cpu_output_cache.enabled(...); a general allocator that keeps freed pages
// mapped (jemalloc, tcmalloc; see benchmarks/README.md) removes the same page faults for every op.
//
// Why it exists: glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
// mapping and unmaps it on free, so each large output of every training step is faulted in again,
// page by page (kernel page allocation, memory cgroup charge, zeroing): at the concept-attention
// benchmark shape that is a large share of the op's forward+backward time, more than the arithmetic
// (benchmarks/README.md, "CPU allocators and page faults"). The CUDA caching allocator exists for the
// same reason. A request takes the smallest cached block that fits and is less than twice its size
// (a training step asks for the same sizes every time; varying ones still find a block); the cache
// holds at most `limit` bytes and oclear_ext.cpu_output_cache.empty() gives everything back. Blocks
// handed out and given back are reported to torch's profiler (profile_memory=True) as torch's own CPU
// allocator reports its blocks; cached free blocks are not tensors and are not reported (stats() says
// how many bytes the cache holds).
//
// Eviction. A freed block that does not fit under the limit may evict *stale* blocks, oldest first:
// blocks that have sat through more large requests than twice the longest wait after which any block
// was ever taken again, plus kStaleSlack. In a steady loop every cached block is taken again within
// one step's requests, so nothing is stale; a step whose outputs exceed the limit then keeps the same
// blocks every step, its largest ones (a freed block evicts smaller ones when that caches more bytes;
// the surplus goes back to the system). Evicting by age alone would let each free evict the block the
// next request needs, and miss every time in some loops. After a change of shapes
// the old sizes go stale within a few steps and make way for the new ones; keeping them forever would
// leave later shapes on fresh pages (a smaller shape after larger ones runs as fast as with a clean
// cache: benchmarks/results/concept_attention_cpu_float32_shape_change.json).
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace oclear::cpu {
namespace {

// Below this glibc's heap reuses freed memory by itself (no fresh pages in steady state).
constexpr size_t kMinCachedBytes = size_t{1} << 20;
// A block is stale after more than 2 x (the longest wait of any reused block) + kStaleSlack requests.
constexpr uint64_t kStaleSlack = 8;

class OutputCache final : public c10::Allocator {
 public:
  // Whether a request of n bytes goes through the cache (on, and a large block); the others take torch's
  // CPU allocator. Requests above the limit still go through it: they are never cached, but they count
  // as requests for the eviction rule's notion of time.
  bool takes(size_t n) const { return n >= kMinCachedBytes && limit_.load(std::memory_order_relaxed) > 0; }

  c10::DataPtr allocate(size_t n) override {
    // Reached by empty_output for requests the cache takes, and by a resize of a tensor it handed out.
    if (n < kMinCachedBytes) return wrap(c10::alloc_cpu(n), n);
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
        return wrap(ptr, n);
      }
      ++misses_;
    }
    void* ptr = c10::alloc_cpu(n);  // outside the lock: a fresh mapping
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_[ptr] = Block{n, false};
    }
    return wrap(ptr, n);
  }

  static bool owns(const c10::DataPtr& p) { return p.get_deleter() == &release; }

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
    return {cached_, limit_.load(std::memory_order_relaxed), hits_, misses_};
  }

  void set_limit(int64_t bytes) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_.store(bytes, std::memory_order_relaxed);
      evict_oldest_until(bytes, evicted);
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
  // A block handed out as tensor memory: reported to torch's profiler as torch's CPU allocator does.
  static c10::DataPtr wrap(void* ptr, size_t n) {
    c10::profiledCPUMemoryReporter().New(ptr, n);
    return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void give_back(void* ptr) {
    c10::profiledCPUMemoryReporter().Delete(ptr);
    std::vector<void*> evicted;
    bool cached = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = live_.find(ptr);
      if (it != live_.end()) {
        const auto n = static_cast<int64_t>(it->second.bytes);
        live_.erase(it);
        if (n <= limit_.load(std::memory_order_relaxed) && make_room(n, evicted)) {
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
    const int64_t limit = limit_.load(std::memory_order_relaxed);
    evict_oldest_until(limit - n, evicted, /*stale_only=*/true);
    if (cached_ + n <= limit) return true;
    std::vector<std::multimap<size_t, FreeBlock>::iterator> smaller;
    int64_t freed = 0;
    for (auto it = free_.lower_bound(static_cast<size_t>(n)); it != free_.begin() && cached_ - freed + n > limit;) {
      --it;
      smaller.push_back(it);
      freed += static_cast<int64_t>(it->first);
    }
    if (cached_ - freed + n > limit || freed >= n) return false;
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
  int64_t cached_ = 0, hits_ = 0, misses_ = 0;
  // Written under mutex_; read without it by takes() (a request racing with set_limit may go either way).
  std::atomic<int64_t> limit_{0};  // off until the application turns it on
  uint64_t requests_ = 0;             // large allocations so far
  uint64_t returned_ = 0;             // blocks cached so far
  uint64_t longest_reuse_wait_ = 0;   // most requests a cached block sat through before it was taken
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  OutputCache& cache = OutputCache::instance();
  const size_t bytes = c10::multiply_integers(sizes) * c10::elementSize(dtype);
  if (!cache.takes(bytes)) return at::empty(sizes, at::TensorOptions().dtype(dtype).device(at::kCPU));
  return at::detail::empty_generic(sizes, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   at::MemoryFormat::Contiguous);
}

bool output_block_reused(const at::Tensor& t) {
  return t.defined() && t.is_cpu() && t.storage_offset() == 0 && OutputCache::owns(t.storage().data_ptr()) &&
         OutputCache::instance().reused(t.storage().data());
}

OutputCacheStats output_cache_stats() { return OutputCache::instance().stats(); }

void output_cache_empty() { OutputCache::instance().empty(); }

void output_cache_set_limit(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes >= 0, "cpu output cache: the limit must be >= 0 bytes, got ", bytes);
  OutputCache::instance().set_limit(bytes);
}

}  // namespace oclear::cpu

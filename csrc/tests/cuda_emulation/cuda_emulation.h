// CPU emulation of the few CUDA device features the tensor-core attention kernels use, so that their
// code runs, unchanged, in a C++ unit test on a machine without a GPU (csrc/tests/
// test_concept_attention_tc_emulated.cpp). One std::thread per CUDA thread and one block at a time;
// __syncthreads, __syncwarp and warp shuffles are barriers (a kernel that reaches a barrier with part of
// its block hangs here as on a GPU); WMMA fragments hold the whole 16 x 16 tile in every lane, so a
// collective load / mma / store means the same as on the hardware, and the loads and stores check the
// alignment and leading-dimension rules. Because the threads are real and the barriers are mutexes, a
// build with -fsanitize=thread reports two CUDA threads of one block touching one word without a
// barrier between them (blocks run one after another, so races between blocks cannot show). What this
// cannot show: speed, hardware faults, the hardware's own instruction ordering.
//
// Shared memory: `__shared__` expands to nothing, which suits `extern __shared__` arrays (the test defines
// the array itself). A test of kernels with static `__shared__` arrays redefines it as `static` before
// including them: one array per kernel, shared by the threads of the one block that runs at a time.
#pragma once

#include <cassert>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __align__(n)
#define __launch_bounds__(...)

namespace cuda_emulation {

struct Index {
  unsigned x = 0, y = 0, z = 0;
};

// A reusable barrier for a fixed number of threads.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const long generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation != generation_; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_, arrived_ = 0;
  long generation_ = 0;
};

struct Block {
  explicit Block(int threads) : block(threads), shuffle(threads) {
    for (int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<Barrier>(32));
  }
  Barrier block;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<float> shuffle;
};

inline thread_local Index thread_idx, block_idx;
inline Index grid_dim;  // set by launch before any thread starts, read-only while they run
inline Block* current_block = nullptr;

// Runs kernel() for every thread of a grid.x x grid.y grid of blocks of `threads` threads (a multiple of 32),
// block by block (x fastest); before_block(b) and after_block(b), when given, run on the calling thread around
// block b = y * grid.x + x (the tests poison and check shared memory there).
inline void launch(Index grid, unsigned threads, const std::function<void()>& kernel,
                   const std::function<void(unsigned)>& before_block = {},
                   const std::function<void(unsigned)>& after_block = {}) {
  grid_dim = {grid.x, grid.y, 1};
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      const unsigned b = by * grid.x + bx;
      if (before_block) before_block(b);
      Block block(static_cast<int>(threads));
      current_block = &block;
      std::vector<std::thread> pool;
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, bx, by, t] {
          thread_idx.x = t;
          block_idx.x = bx;
          block_idx.y = by;
          kernel();
        });
      }
      for (auto& th : pool) th.join();
      current_block = nullptr;
      if (after_block) after_block(b);
    }
  }
}

inline void launch(unsigned grid, unsigned threads, const std::function<void()>& kernel,
                   const std::function<void(unsigned)>& before_block = {},
                   const std::function<void(unsigned)>& after_block = {}) {
  launch(Index{grid, 1, 1}, threads, kernel, before_block, after_block);
}

inline Barrier& warp_barrier() { return *current_block->warps[thread_idx.x / 32]; }

}  // namespace cuda_emulation

#define threadIdx (::cuda_emulation::thread_idx)
#define blockIdx (::cuda_emulation::block_idx)
#define gridDim (::cuda_emulation::grid_dim)

inline void __syncthreads() { cuda_emulation::current_block->block.wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { cuda_emulation::warp_barrier().wait(); }

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  float* slots = cuda_emulation::current_block->shuffle.data() + threadIdx.x / 32 * 32;
  const unsigned lane = threadIdx.x % 32;
  slots[lane] = value;
  cuda_emulation::warp_barrier().wait();
  const float other = slots[lane ^ static_cast<unsigned>(lane_mask)];
  cuda_emulation::warp_barrier().wait();
  return other;
}

// A relaxed compare-and-swap loop, as the hardware's atomic is unordered: a mutex here would order the
// threads that take it, and ThreadSanitizer would then miss races around the atomics.
inline float atomicAdd(float* address, float value) {
  static_assert(sizeof(float) == sizeof(std::uint32_t));
  auto* bits = reinterpret_cast<std::uint32_t*>(address);
  std::uint32_t expected = __atomic_load_n(bits, __ATOMIC_RELAXED), desired;
  float old;
  do {
    std::memcpy(&old, &expected, sizeof old);
    const float sum = old + value;
    std::memcpy(&desired, &sum, sizeof desired);
  } while (!__atomic_compare_exchange_n(bits, &expected, desired, /*weak=*/true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
[[noreturn]] inline void __trap() { std::abort(); }

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

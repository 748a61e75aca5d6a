// Emulation stub (see cuda_emulation.h): nvcuda::wmma for 16 x 16 x 16 tiles, float32 accumulation.
// Every lane holds the whole tile; loads and stores check WMMA's pointer alignment (32 bytes) and
// leading-dimension rules (a multiple of 8 elements for 16-bit types, of 4 for float32).
#pragma once
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_emulation.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation has 16 x 16 x 16 tiles only");
  float v[16][16];
};

inline float element(float x) { return x; }
inline float element(__nv_bfloat16 x) { return __bfloat162float(x); }
inline float element(__half x) { return __half2float(x); }

inline void check_pointer(const void* p, unsigned ldm, unsigned element_bytes) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) {
    std::fprintf(stderr, "wmma emulation: pointer %p is not 32-byte aligned\n", p);
    std::abort();
  }
  if (ldm % (16 / element_bytes) != 0) {
    std::fprintf(stderr, "wmma emulation: ldm %u is not a multiple of %u elements\n", ldm, 16 / element_bytes);
    std::abort();
  }
}

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float x) {
  for (auto& row : f.v)
    for (float& e : row) e = x;
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>, "matrix_a / matrix_b only");
  check_pointer(p, ldm, sizeof(T));
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = element(std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r]);
}

// Each lane writes its share of the tile (the kernel's own __syncwarp orders it with later reads).
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t layout) {
  assert(layout == mem_row_major);
  check_pointer(p, ldm, sizeof(float));
  for (unsigned e = threadIdx.x % 32; e < 256; e += 32) p[e / 16 * ldm + e % 16] = f.v[e / 16][e % 16];
}

template <typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) {
      float acc = c.v[r][n];
      for (int k = 0; k < 16; ++k) acc += a.v[r][k] * b.v[k][n];
      out[r][n] = acc;
    }
  std::memcpy(d.v, out, sizeof out);
}

}  // namespace nvcuda::wmma

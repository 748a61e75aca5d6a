// Tensor-core concept attention (WMMA 16x16x16 tiles, bfloat16 / float16 operands, float32
// accumulation) for the fusion's shapes: Dh in {16, 32, 64} and up to 256 keys (as many as fit in
// the device's shared memory, at most 200 KiB: 192 at Dh = 64 on an H100, 144 on an A100; 224 / 176 at
// Dh = 32), so that a whole key row is in shared memory and the
// softmax is exact per row (no online rescaling). Dh = 128 would spill its dK/dV accumulators.
//   forward  block = (b, h, 64 queries), 4 warps x 16 query rows: S = Q K^T (float32, shared memory),
//            P = softmax(scale S + mask) rounded to the input type, O = P V; lse per row.
//   dq       same grid: delta = rowsum(dO * O); S = Q K^T, dP = dO V^T, dS = P (dP - delta) rounded
//            to the input type, dQ = scale dS K.
//   dk, dv   block = (h, 64 keys, batch element or chunk of the batch), 4 warps x 16 keys; queries
//            staged 64 at a time: S^T = K Q^T, dP^T = V dO^T, then dV += P^T dO and dK += dS^T Q in
//            accumulator fragments over the block's whole loop; a shared memory's sums go to the
//            float32 accumulators (atomicAdd, once per block) that the caller casts.
// P and dS are rounded to 16 bits before their products, as FlashAttention does; scores, softmax
// statistics and accumulators stay float32. Conventions (lse, delta, a row without keys: zeros and no
// gradient) are those of the CUDA-core kernels in concept_attention.cu, which handle every other case.
// Shared-memory tiles start 128-byte aligned and their rows are padded (16-bit rows by 8 elements,
// float rows by 4): every WMMA pointer is 32-byte aligned and consecutive rows start in other banks.
#include "concept_attention.cuh"

#include <mma.h>

#include <cstdint>

#include "attention_device.cuh"

namespace oclear::cuda {
namespace {

namespace wmma = nvcuda::wmma;
using attention::allow_shared;
using attention::from_float;
using attention::warp_max;
using attention::warp_sum;

constexpr int kTile = 16;  // WMMA tile edge
constexpr int kWarps = 4;
// Every kernel declares __launch_bounds__(kThreads, 1): without the one-block minimum ptxas caps their
// registers and spills (the dK/dV kernel holds 2 x dh / 16 accumulator tiles, up to 254 registers).
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = kTile * kWarps;  // queries per forward / dq block, keys per dk/dv block
constexpr int kQueryStage = 64;        // queries staged per step of the dk/dv kernel
constexpr int kMaxKeys = 256;
constexpr int kPad16 = 8;
constexpr int kPad32 = 4;
constexpr size_t kMaxSharedBytes = 200 * 1024;

using FragC = wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float>;
template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major>;
template <typename T>
using FragBRow = wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::row_major>;
template <typename T>
using FragBCol = wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::col_major>;

struct TcParams {
  int64_t batch, heads, lq, lk;
  int lkp;  // lk rounded up to a multiple of 16
  bool kv_broadcast;
  int64_t q_strides[3], k_strides[3], v_strides[3];
  bool vec_q, vec_k, vec_v, vec_go;  // 16-byte loads are aligned for q, k, v, grad_out
  const bool* mask;
  float scale;
};

bool aligned16(const void* ptr, const int64_t* strides, int n) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  for (int i = 0; i < n; ++i) {
    if (strides[i] % 8 != 0) return false;
  }
  return true;
}

TcParams make_params(const AttentionArgs& a, const void* grad_out) {
  TcParams p;
  p.batch = a.batch;
  p.heads = a.heads;
  p.lq = a.lq;
  p.lk = a.lk;
  p.lkp = static_cast<int>((a.lk + kTile - 1) / kTile * kTile);
  p.kv_broadcast = a.kv_broadcast;
  for (int i = 0; i < 3; ++i) {
    p.q_strides[i] = a.q_strides[i];
    p.k_strides[i] = a.kv_broadcast && i == 0 ? 0 : a.k_strides[i];
    p.v_strides[i] = a.kv_broadcast && i == 0 ? 0 : a.v_strides[i];
  }
  p.vec_q = aligned16(a.q, p.q_strides, 3);
  p.vec_k = aligned16(a.k, p.k_strides, 3);
  p.vec_v = aligned16(a.v, p.v_strides, 3);
  p.vec_go = grad_out != nullptr && reinterpret_cast<uintptr_t>(grad_out) % 16 == 0;
  p.mask = a.mask;
  p.scale = a.scale;
  return p;
}

__host__ __device__ constexpr size_t align128(size_t x) { return (x + 127) / 128 * 128; }

// Shared memory of the forward and dq kernels (byte offsets): K and V rows [lkp][dh + 8] and the key
// bias [lkp] for the block; per warp Q [16][dh + 8], dO (dq), S [16][max(lkp, dh) + 4] (float32, also
// the staging of the 16 x dh result), dP [16][lkp + 4] (dq), P or dS [16][lkp + 8] (16-bit), and the
// rows' lse and delta (dq).
struct QueryLayout {
  size_t k, v, bias, warps, per_warp, q, dout, s, dp, p, stats, total;
};

__host__ __device__ inline QueryLayout query_layout(int dh, int lkp, bool backward) {
  QueryLayout l{};
  const size_t ld16 = dh + kPad16;
  size_t o = 0;
  l.k = o;
  o = align128(o + lkp * ld16 * 2);
  l.v = o;
  o = align128(o + lkp * ld16 * 2);
  l.bias = o;
  o = align128(o + lkp * sizeof(float));
  l.warps = o;
  size_t w = 0;
  l.q = w;
  w = align128(w + kTile * ld16 * 2);
  l.dout = w;
  if (backward) w = align128(w + kTile * ld16 * 2);
  l.s = w;
  w = align128(w + kTile * ((lkp > dh ? lkp : dh) + kPad32) * sizeof(float));
  l.dp = w;
  if (backward) w = align128(w + kTile * (lkp + kPad32) * sizeof(float));
  l.p = w;
  w = align128(w + kTile * (lkp + kPad16) * 2);
  l.stats = w;
  if (backward) w = align128(w + 2 * kTile * sizeof(float));
  l.per_warp = w;
  l.total = o + kWarps * w;
  return l;
}

// Shared memory of the dk/dv kernel: the block's K and V rows [64][dh + 8] and which of its keys the current
// batch element attends to [64]; the staged queries' Q and dO [64][dh + 8], lse and delta [64]; per warp
// S^T and dP^T [16][64 + 4] (float32; S^T also stages the 16 x dh results, dh + 4 <= 68) and P^T and
// dS^T [16][64 + 8] (16-bit).
struct KeyLayout {
  size_t k, v, key_ok, q, dout, lse, delta, warps, per_warp, st, dpt, pt, dst, total;
};

__host__ __device__ inline KeyLayout key_layout(int dh) {
  KeyLayout l{};
  const size_t ld16 = dh + kPad16, rows16 = kRows * ld16 * 2, stage16 = kQueryStage * ld16 * 2;
  size_t o = 0;
  l.k = o;
  o = align128(o + rows16);
  l.v = o;
  o = align128(o + rows16);
  l.key_ok = o;
  o = align128(o + kRows);
  l.q = o;
  o = align128(o + stage16);
  l.dout = o;
  o = align128(o + stage16);
  l.lse = o;
  o = align128(o + kQueryStage * sizeof(float));
  l.delta = o;
  o = align128(o + kQueryStage * sizeof(float));
  l.warps = o;
  const size_t scores = kTile * (kQueryStage + kPad32) * sizeof(float);  // a multiple of 128
  size_t w = 0;
  l.st = w;
  l.dpt = w + scores;
  w = align128(w + 2 * scores);
  l.pt = w;
  w = align128(w + kTile * (kQueryStage + kPad16) * 2);
  l.dst = w;
  w = align128(w + kTile * (kQueryStage + kPad16) * 2);
  l.per_warp = w;
  l.total = o + kWarps * w;
  return l;
}

__device__ __forceinline__ bool is_key(const TcParams& p, int64_t b, int64_t j) {
  return j < p.lk && !(p.mask != nullptr && p.mask[b * p.lk + j]);
}

// Rows [row0, row0 + rows) of a (b, h) slice into shared memory (ld elements per row) by threads
// tid, tid + nthreads, ...; rows past `limit` are zero. 16-byte loads when `vec` (aligned rows).
template <typename T>
__device__ __forceinline__ void stage_rows(T* dst, int ld, const T* src, int64_t row_stride, int64_t row0, int rows,
                                           int64_t limit, int dh, bool vec, int tid, int nthreads) {
  if (vec) {
    const int chunks = dh / 8;
    for (int x = tid; x < rows * chunks; x += nthreads) {
      const int r = x / chunks, c = x - r * chunks;
      const int64_t j = row0 + r;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (j < limit) val = *reinterpret_cast<const uint4*>(src + j * row_stride + c * 8);
      *reinterpret_cast<uint4*>(dst + r * ld + c * 8) = val;
    }
  } else {
    for (int x = tid; x < rows * dh; x += nthreads) {
      const int r = x / dh, d = x - r * dh;
      const int64_t j = row0 + r;
      dst[r * ld + d] = j < limit ? src[j * row_stride + d] : from_float<T>(0.f);
    }
  }
}

// out[16][n * 16] = a[16][kdim] @ B, B read as row-major [kdim][n * 16] (kRowMajorB) or as the
// transpose of row-major [n * 16][kdim]; stored float32 with leading dimension ldo.
template <typename T, bool kRowMajorB>
__device__ __forceinline__ void tile_product(float* out, int ldo, const T* a, int lda, const T* b, int ldb, int n_tiles,
                                             int k_tiles) {
  for (int n = 0; n < n_tiles; ++n) {
    FragC acc;
    wmma::fill_fragment(acc, 0.f);
    for (int kk = 0; kk < k_tiles; ++kk) {
      FragA<T> fa;
      wmma::load_matrix_sync(fa, a + kk * kTile, lda);
      if constexpr (kRowMajorB) {
        FragBRow<T> fb;
        wmma::load_matrix_sync(fb, b + kk * kTile * ldb + n * kTile, ldb);
        wmma::mma_sync(acc, fa, fb, acc);
      } else {
        FragBCol<T> fb;
        wmma::load_matrix_sync(fb, b + n * kTile * ldb + kk * kTile, ldb);
        wmma::mma_sync(acc, fa, fb, acc);
      }
    }
    wmma::store_matrix_sync(out + n * kTile, acc, ldo, wmma::mem_row_major);
  }
}

// A block of the forward / dq grid (outer = batch element, tiles of 64 queries) or of the dk/dv grid
// (outer = batch element or chunk, tiles of 64 keys): blockIdx.x = (outer * heads + h) * tiles + tile.
struct BlockIndex {
  int64_t tile, h, outer;
};

__device__ __forceinline__ BlockIndex block_index(int64_t rows, int64_t heads) {
  const int64_t tiles = (rows + kRows - 1) / kRows;
  return {blockIdx.x % tiles, (blockIdx.x / tiles) % heads, blockIdx.x / (tiles * heads)};
}

// Rows [row0, row0 + rows) of the (b, h) slice of q, k or v (strides of (batch, head, row); the batch
// stride is 0 for a shared memory) into shared-memory rows of kDh + 8 elements.
template <typename T, int kDh>
__device__ __forceinline__ void stage_slice(T* dst, const T* base, const int64_t* strides, bool vec, int64_t b,
                                            int64_t h, int64_t row0, int rows, int64_t limit, int tid, int nthreads) {
  stage_rows(dst, kDh + kPad16, base + b * strides[0] + h * strides[1], strides[2], row0, rows, limit, kDh, vec, tid,
             nthreads);
}

// The forward and dq blocks' shared memory, carved from query_layout: the block's K and V rows and key
// bias, and this warp's slices (dout, dp and stats have room only in the backward's layout).
template <typename T>
struct QuerySmem {
  T* k;
  T* v;
  float* bias;
  T* q;
  T* dout;
  float* s;
  float* dp;
  T* p;
  float* stats;
  __device__ QuerySmem(unsigned char* smem, const QueryLayout& lay, int warp) {
    unsigned char* mine = smem + lay.warps + warp * lay.per_warp;
    k = reinterpret_cast<T*>(smem + lay.k);
    v = reinterpret_cast<T*>(smem + lay.v);
    bias = reinterpret_cast<float*>(smem + lay.bias);
    q = reinterpret_cast<T*>(mine + lay.q);
    dout = reinterpret_cast<T*>(mine + lay.dout);
    s = reinterpret_cast<float*>(mine + lay.s);
    dp = reinterpret_cast<float*>(mine + lay.dp);
    p = reinterpret_cast<T*>(mine + lay.p);
    stats = reinterpret_cast<float*>(mine + lay.stats);
  }
};

// The warp's 16 x kDh result rows, staged as float32 (ld lds), times factor into dst's (b, h) rows
// from r0 (rows past Lq are not written).
template <typename T, int kDh>
__device__ __forceinline__ void store_query_rows(const TcParams& p, const float* staged, int lds, float factor, T* dst,
                                                 int64_t bh, int64_t r0) {
  for (int x = threadIdx.x % 32; x < kTile * kDh; x += 32) {
    const int r = x / kDh, d = x - r * kDh;
    if (r0 + r < p.lq) dst[(bh * p.lq + r0 + r) * kDh + d] = from_float<T>(factor * staged[r * lds + d]);
  }
}

// What the forward and dq blocks stage alike: the (b, h) keys, values and key bias (0 or -inf, keys past
// Lk included) by the whole block, and the warp's 16 query rows from r0 by the warp.
template <typename T, int kDh>
__device__ __forceinline__ void stage_query_block(const TcParams& p, int64_t b, int64_t h, int64_t r0, const T* q,
                                                  const T* k, const T* v, T* ks, T* vs, float* bias, T* qs) {
  stage_slice<T, kDh>(ks, k, p.k_strides, p.vec_k, b, h, 0, p.lkp, p.lk, threadIdx.x, kThreads);
  stage_slice<T, kDh>(vs, v, p.v_strides, p.vec_v, b, h, 0, p.lkp, p.lk, threadIdx.x, kThreads);
  for (int j = threadIdx.x; j < p.lkp; j += kThreads) bias[j] = is_key(p, b, j) ? 0.f : -INFINITY;
  stage_slice<T, kDh>(qs, q, p.q_strides, p.vec_q, b, h, r0, kTile, p.lq, threadIdx.x % 32, 32);
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
template <typename T, int kDh>
__global__ void __launch_bounds__(kThreads, 1) forward_tc_kernel(TcParams p, const T* __restrict__ q, const T* __restrict__ k,
                                                              const T* __restrict__ v, T* __restrict__ out,
                                                              float* __restrict__ lse) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 WMMA needs sm_80; the glue never selects this path there
#else
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int ld16 = kDh + kPad16;
  const int lkp = p.lkp, lds = (lkp > kDh ? lkp : kDh) + kPad32, ldp = lkp + kPad16;
  const QueryLayout lay = query_layout(kDh, lkp, false);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const QuerySmem<T> sm(smem, lay, warp);
  T *ks = sm.k, *vs = sm.v, *qs = sm.q, *ps = sm.p;
  float *bias = sm.bias, *ss = sm.s;

  const BlockIndex blk = block_index(p.lq, p.heads);
  const int64_t b = blk.outer, h = blk.h, bh = b * p.heads + h;
  const int64_t r0 = blk.tile * kRows + warp * kTile;  // this warp's first query

  stage_query_block<T, kDh>(p, b, h, r0, q, k, v, ks, vs, bias, qs);
  __syncthreads();
  if (r0 >= p.lq) return;  // warp-uniform; no barrier follows

  tile_product<T, false>(ss, lds, qs, ld16, ks, ld16, lkp / kTile, kDh / kTile);  // S = Q K^T
  __syncwarp();
  // Softmax of each row, whole: the warp walks the 16 rows, each lane its keys j = lane + 32 t.
  for (int r = 0; r < kTile; ++r) {
    float* srow = ss + r * lds;
    float m = -INFINITY;
    for (int j = lane; j < lkp; j += 32) m = fmaxf(m, srow[j] * p.scale + bias[j]);
    m = warp_max(m);
    float l = 0.f;
    for (int j = lane; j < lkp; j += 32) {
      const float e = m == -INFINITY ? 0.f : __expf(srow[j] * p.scale + bias[j] - m);  // a padded key: exp(-inf) = 0
      srow[j] = e;
      l += e;
    }
    l = warp_sum(l);
    const float inv = l > 0.f ? 1.f / l : 0.f;  // a row without keys: P = 0, so O = 0
    for (int j = lane; j < lkp; j += 32) ps[r * ldp + j] = from_float<T>(srow[j] * inv);
    if (lane == 0 && r0 + r < p.lq) lse[bh * p.lq + r0 + r] = l > 0.f ? m + __logf(l) : -INFINITY;
  }
  __syncwarp();
  tile_product<T, true>(ss, lds, ps, ldp, vs, ld16, kDh / kTile, lkp / kTile);  // O = P V, staged in ss
  __syncwarp();
  store_query_rows<T, kDh>(p, ss, lds, 1.f, out, bh, r0);
#endif
}

// ------------------------------------------------------------------------------------------------
// Backward 1: delta = rowsum(dO * O), dq = scale * dS K
// ------------------------------------------------------------------------------------------------
template <typename T, int kDh>
__global__ void __launch_bounds__(kThreads, 1)
    dq_tc_kernel(TcParams p, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                 const T* __restrict__ grad_out, const T* __restrict__ out, const float* __restrict__ lse,
                 float* __restrict__ delta, T* __restrict__ grad_q) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 WMMA needs sm_80; the glue never selects this path there
#else
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int ld16 = kDh + kPad16;
  const int lkp = p.lkp, lds = (lkp > kDh ? lkp : kDh) + kPad32, ldd = lkp + kPad32, ldp = lkp + kPad16;
  const QueryLayout lay = query_layout(kDh, lkp, true);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const QuerySmem<T> sm(smem, lay, warp);
  T *ks = sm.k, *vs = sm.v, *qs = sm.q, *dos = sm.dout, *dss = sm.p;
  float *bias = sm.bias, *ss = sm.s, *dps = sm.dp, *row_lse = sm.stats, *row_delta = sm.stats + kTile;

  const BlockIndex blk = block_index(p.lq, p.heads);
  const int64_t b = blk.outer, h = blk.h, bh = b * p.heads + h;
  const int64_t r0 = blk.tile * kRows + warp * kTile;

  if (grad_q != nullptr) stage_query_block<T, kDh>(p, b, h, r0, q, k, v, ks, vs, bias, qs);  // block-uniform
  stage_rows(dos, ld16, grad_out + bh * p.lq * kDh, kDh, r0, kTile, p.lq, kDh, p.vec_go, lane, 32);
  __syncwarp();
  for (int r = 0; r < kTile; ++r) {
    const int64_t i = r0 + r;
    float dsum = 0.f;
    if (i < p.lq) {
      const T* orow = out + (bh * p.lq + i) * kDh;
      for (int d = lane; d < kDh; d += 32) dsum += attention::to_float(dos[r * ld16 + d]) * attention::to_float(orow[d]);
    }
    dsum = warp_sum(dsum);
    if (lane == 0) {
      row_delta[r] = dsum;
      row_lse[r] = i < p.lq ? lse[bh * p.lq + i] : -INFINITY;
      if (i < p.lq) delta[bh * p.lq + i] = dsum;
    }
  }
  __syncthreads();
  if (grad_q == nullptr || r0 >= p.lq) return;  // warp-uniform; no barrier follows

  tile_product<T, false>(ss, lds, qs, ld16, ks, ld16, lkp / kTile, kDh / kTile);   // S = Q K^T
  tile_product<T, false>(dps, ldd, dos, ld16, vs, ld16, lkp / kTile, kDh / kTile);  // dP = dO V^T
  __syncwarp();
  for (int r = 0; r < kTile; ++r) {
    const float l = row_lse[r], dl = row_delta[r];
    for (int j = lane; j < lkp; j += 32) {
      const float s = ss[r * lds + j] * p.scale + bias[j];
      const float pr = (l == -INFINITY || s == -INFINITY) ? 0.f : __expf(fminf(s - l, 0.f));
      dss[r * ldp + j] = from_float<T>(pr * (dps[r * ldd + j] - dl));
    }
  }
  __syncwarp();
  tile_product<T, true>(ss, lds, dss, ldp, ks, ld16, kDh / kTile, lkp / kTile);  // dS K, staged in ss
  __syncwarp();
  store_query_rows<T, kDh>(p, ss, lds, p.scale, grad_q, bh, r0);
#endif
}

// One warp's 16 x dh result rows (dK or dV): factor * frags through shared memory `staged` (16 x (dh + 4)
// floats), then into grad (per-batch keys) or added to the float32 accumulator (a shared memory).
template <typename T, int kDh>
__device__ __forceinline__ void write_key_rows(const TcParams& p, FragC (&frags)[kDh / kTile], float* staged, T* grad,
                                               float* acc, float factor, int64_t h, int64_t jw, int64_t chunk) {
  if (grad == nullptr) return;
  constexpr int ldo = kDh + kPad32;
  const int lane = threadIdx.x % 32;
  __syncwarp();
#pragma unroll
  for (int n = 0; n < kDh / kTile; ++n) wmma::store_matrix_sync(staged + n * kTile, frags[n], ldo, wmma::mem_row_major);
  __syncwarp();
  for (int x = lane; x < kTile * kDh; x += 32) {
    const int r = x / kDh, d = x - r * kDh;
    const int64_t j = jw + r;
    if (j >= p.lk) continue;
    const float val = factor * staged[r * ldo + d];
    if (p.kv_broadcast) {
      atomicAdd(acc + (h * p.lk + j) * kDh + d, val);
    } else {
      grad[((chunk * p.heads + h) * p.lk + j) * kDh + d] = from_float<T>(val);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward 2: dv_j = sum_i P_ij dO_i, dk_j = scale * sum_i dS_ij q_i over one batch element (per-batch
// keys) or a chunk of the batch (shared keys).
// ------------------------------------------------------------------------------------------------
template <typename T, int kDh>
__global__ void __launch_bounds__(kThreads, 1)
    dkdv_tc_kernel(TcParams p, int64_t batch_chunks, const T* __restrict__ q, const T* __restrict__ k,
                   const T* __restrict__ v, const T* __restrict__ grad_out, const float* __restrict__ lse,
                   const float* __restrict__ delta, T* __restrict__ grad_k, T* __restrict__ grad_v,
                   float* __restrict__ acc_k, float* __restrict__ acc_v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 WMMA needs sm_80; the glue never selects this path there
#else
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int ld16 = kDh + kPad16, ldst = kQueryStage + kPad32, ldpt = kQueryStage + kPad16;
  constexpr int kTilesD = kDh / kTile;
  const KeyLayout lay = key_layout(kDh);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  T* kb = reinterpret_cast<T*>(smem + lay.k);
  T* vb = reinterpret_cast<T*>(smem + lay.v);
  T* qs = reinterpret_cast<T*>(smem + lay.q);
  T* dos = reinterpret_cast<T*>(smem + lay.dout);
  bool* key_ok = reinterpret_cast<bool*>(smem + lay.key_ok);
  float* lse_s = reinterpret_cast<float*>(smem + lay.lse);
  float* delta_s = reinterpret_cast<float*>(smem + lay.delta);
  unsigned char* mine = smem + lay.warps + warp * lay.per_warp;
  float* st = reinterpret_cast<float*>(mine + lay.st);
  float* dpt = reinterpret_cast<float*>(mine + lay.dpt);
  T* pt = reinterpret_cast<T*>(mine + lay.pt);
  T* dst = reinterpret_cast<T*>(mine + lay.dst);

  const BlockIndex blk = block_index(p.lk, p.heads);
  const int64_t tile = blk.tile, h = blk.h, chunk = blk.outer;
  const int64_t jw = tile * kRows + warp * kTile;  // this warp's first key
  const T* kw = kb + warp * kTile * ld16;
  const T* vw = vb + warp * kTile * ld16;

  // The block's keys and values: batch element `chunk` (a shared memory's batch stride is 0).
  stage_slice<T, kDh>(kb, k, p.k_strides, p.vec_k, chunk, h, tile * kRows, kRows, p.lk, threadIdx.x, kThreads);
  stage_slice<T, kDh>(vb, v, p.v_strides, p.vec_v, chunk, h, tile * kRows, kRows, p.lk, threadIdx.x, kThreads);

  FragC dk[kTilesD], dv[kTilesD];
#pragma unroll
  for (int n = 0; n < kTilesD; ++n) {
    wmma::fill_fragment(dk[n], 0.f);
    wmma::fill_fragment(dv[n], 0.f);
  }

  for (int64_t b = chunk; b < p.batch; b += batch_chunks) {
    const int64_t bh = b * p.heads + h;
    for (int64_t i0 = 0; i0 < p.lq; i0 += kQueryStage) {
      __syncthreads();  // the previous stage is consumed (and, the first time, K and V are staged)
      stage_slice<T, kDh>(qs, q, p.q_strides, p.vec_q, b, h, i0, kQueryStage, p.lq, threadIdx.x, kThreads);
      stage_rows(dos, ld16, grad_out + bh * p.lq * kDh, kDh, i0, kQueryStage, p.lq, kDh, p.vec_go, threadIdx.x,
                 kThreads);
      for (int t = threadIdx.x; t < kQueryStage; t += kThreads) {
        const int64_t i = i0 + t;
        lse_s[t] = i < p.lq ? lse[bh * p.lq + i] : -INFINITY;
        delta_s[t] = i < p.lq ? delta[bh * p.lq + i] : 0.f;
      }
      for (int t = threadIdx.x; t < kRows; t += kThreads) key_ok[t] = is_key(p, b, tile * kRows + t);
      __syncthreads();
      if (jw >= p.lk) continue;  // warp-uniform: this warp has no keys (its barriers are still met)
      tile_product<T, false>(st, ldst, kw, ld16, qs, ld16, kQueryStage / kTile, kTilesD);    // S^T = K Q^T
      tile_product<T, false>(dpt, ldst, vw, ld16, dos, ld16, kQueryStage / kTile, kTilesD);  // dP^T = V dO^T
      __syncwarp();
      for (int x = lane; x < kTile * kQueryStage; x += 32) {
        const int r = x / kQueryStage, t = x - r * kQueryStage;
        const float l = lse_s[t];
        const float pr = (!key_ok[warp * kTile + r] || l == -INFINITY)
                             ? 0.f
                             : __expf(fminf(st[r * ldst + t] * p.scale - l, 0.f));
        pt[r * ldpt + t] = from_float<T>(pr);
        dst[r * ldpt + t] = from_float<T>(pr * (dpt[r * ldst + t] - delta_s[t]));
      }
      __syncwarp();
#pragma unroll
      for (int n = 0; n < kTilesD; ++n) {
        for (int kk = 0; kk < kQueryStage / kTile; ++kk) {
          FragA<T> fa;
          FragBRow<T> fb;
          wmma::load_matrix_sync(fa, pt + kk * kTile, ldpt);  // dV += P^T dO
          wmma::load_matrix_sync(fb, dos + kk * kTile * ld16 + n * kTile, ld16);
          wmma::mma_sync(dv[n], fa, fb, dv[n]);
          wmma::load_matrix_sync(fa, dst + kk * kTile, ldpt);  // dK += dS^T Q
          wmma::load_matrix_sync(fb, qs + kk * kTile * ld16 + n * kTile, ld16);
          wmma::mma_sync(dk[n], fa, fb, dk[n]);
        }
      }
    }
    if (!p.kv_broadcast) break;  // per-batch keys: this block owns exactly batch element `chunk`
  }
  if (jw >= p.lk) return;  // no barrier follows

  // The 16 x dh results through shared memory (S^T holds 16 x (dh + 4) floats).
  write_key_rows<T, kDh>(p, dk, st, grad_k, acc_k, p.scale, h, jw, chunk);
  write_key_rows<T, kDh>(p, dv, st, grad_v, acc_v, 1.f, h, jw, chunk);
#endif
}

#ifndef OCLEAR_CUDA_EMULATION  // the CPU emulation test (csrc/tests/cuda_emulation) launches the kernels itself
// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------
template <typename T, int kDh>
cudaError_t forward_typed(const AttentionArgs& a, void* out, float* lse, cudaStream_t stream) {
  const TcParams p = make_params(a, nullptr);
  const size_t bytes = query_layout(kDh, p.lkp, false).total;
  auto kernel = forward_tc_kernel<T, kDh>;
  cudaError_t err = allow_shared(kernel, bytes);
  if (err != cudaSuccess) return err;
  const int64_t blocks = (p.lq + kRows - 1) / kRows * p.heads * p.batch;
  kernel<<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(
      p, static_cast<const T*>(a.q), static_cast<const T*>(a.k), static_cast<const T*>(a.v), static_cast<T*>(out), lse);
  return cudaGetLastError();
}

template <typename T, int kDh>
cudaError_t backward_typed(const AttentionArgs& a, const AttentionGrads& g, cudaStream_t stream) {
  const TcParams p = make_params(a, g.grad_out);
  const auto* q = static_cast<const T*>(a.q);
  const auto* k = static_cast<const T*>(a.k);
  const auto* v = static_cast<const T*>(a.v);
  const auto* grad_out = static_cast<const T*>(g.grad_out);
  auto* grad_k = static_cast<T*>(g.grad_k);
  auto* grad_v = static_cast<T*>(g.grad_v);

  const size_t dq_bytes = query_layout(kDh, p.lkp, true).total;
  auto dq_kernel = dq_tc_kernel<T, kDh>;
  cudaError_t err = allow_shared(dq_kernel, dq_bytes);
  if (err != cudaSuccess) return err;
  const int64_t dq_blocks = (p.lq + kRows - 1) / kRows * p.heads * p.batch;
  dq_kernel<<<static_cast<unsigned>(dq_blocks), kThreads, dq_bytes, stream>>>(
      p, q, k, v, grad_out, static_cast<const T*>(g.out), g.lse, g.delta, static_cast<T*>(g.grad_q));
  err = cudaGetLastError();
  if (err != cudaSuccess || (grad_k == nullptr && grad_v == nullptr)) return err;

  const int64_t key_tiles = (p.lk + kRows - 1) / kRows;
  // Shared keys: enough batch chunks for ~1024 blocks, each summing its chunk in registers.
  int64_t chunks = p.batch;
  if (p.kv_broadcast) {
    const int64_t per_chunk = key_tiles * p.heads;
    chunks = 1024 / (per_chunk > 0 ? per_chunk : 1);
    chunks = chunks < 1 ? 1 : (chunks > p.batch ? p.batch : chunks);
  }
  const size_t kv_bytes = key_layout(kDh).total;
  auto kv_kernel = dkdv_tc_kernel<T, kDh>;
  err = allow_shared(kv_kernel, kv_bytes);
  if (err != cudaSuccess) return err;
  kv_kernel<<<static_cast<unsigned>(key_tiles * p.heads * chunks), kThreads, kv_bytes, stream>>>(
      p, chunks, q, k, v, grad_out, g.lse, g.delta, grad_k, grad_v, g.acc_k, g.acc_v);
  return cudaGetLastError();
}

template <template <typename, int> class Fn, typename... Args>
cudaError_t dispatch(const AttentionArgs& a, Args&&... args) {
  const bool bf16 = a.dtype == AttentionDtype::kBFloat16;
  switch (a.dh) {
    case 16: return bf16 ? Fn<__nv_bfloat16, 16>::run(a, args...) : Fn<__half, 16>::run(a, args...);
    case 32: return bf16 ? Fn<__nv_bfloat16, 32>::run(a, args...) : Fn<__half, 32>::run(a, args...);
    default: return bf16 ? Fn<__nv_bfloat16, 64>::run(a, args...) : Fn<__half, 64>::run(a, args...);
  }
}

template <typename T, int kDh>
struct Forward {
  static cudaError_t run(const AttentionArgs& a, void* out, float* lse, cudaStream_t stream) {
    return forward_typed<T, kDh>(a, out, lse, stream);
  }
};

template <typename T, int kDh>
struct Backward {
  static cudaError_t run(const AttentionArgs& a, const AttentionGrads& g, cudaStream_t stream) {
    return backward_typed<T, kDh>(a, g, stream);
  }
};

#endif  // OCLEAR_CUDA_EMULATION
}  // namespace

#ifndef OCLEAR_CUDA_EMULATION
TcSupport concept_attention_tc_support(const AttentionArgs& a) {
  if (a.dtype == AttentionDtype::kFloat32) return TcSupport::kDtype;
  if (a.dh != 16 && a.dh != 32 && a.dh != 64) return TcSupport::kHeadDim;
  if (a.lk < 1 || a.lk > kMaxKeys || a.lq < 1) return TcSupport::kKeyCount;
  const int lkp = static_cast<int>((a.lk + kTile - 1) / kTile * kTile);
  const int dh = static_cast<int>(a.dh);
  int device = 0, optin = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: clear it, or the caller's next launch check would report it
    return TcSupport::kDeviceQuery;
  }
  if (major < 8) return TcSupport::kArchitecture;  // WMMA on bf16 needs sm_80
  // The kernels this build runs on this device must come from sm_80+ code: a build for older
  // architectures only (e.g. TORCH_CUDA_ARCH_LIST="7.5+PTX" JIT-compiled here) holds kernels that trap.
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, forward_tc_kernel<__nv_bfloat16, 16>) != cudaSuccess) {
    (void)cudaGetLastError();
    return TcSupport::kArchitecture;
  }
  if (attr.ptxVersion < 80) return TcSupport::kArchitecture;
  const size_t limit = static_cast<size_t>(optin) < kMaxSharedBytes ? static_cast<size_t>(optin) : kMaxSharedBytes;
  if (query_layout(dh, lkp, true).total > limit || key_layout(dh).total > limit) return TcSupport::kSharedMemory;
  return TcSupport::kSupported;
}

cudaError_t concept_attention_forward_tc(const AttentionArgs& args, void* out, float* lse, cudaStream_t stream) {
  if (!concept_attention_tc_eligible(args)) return cudaErrorInvalidValue;
  return dispatch<Forward>(args, out, lse, stream);
}

cudaError_t concept_attention_backward_tc(const AttentionArgs& args, const AttentionGrads& grads, cudaStream_t stream) {
  if (!concept_attention_tc_eligible(args)) return cudaErrorInvalidValue;
  return dispatch<Backward>(args, grads, stream);
}

#endif  // OCLEAR_CUDA_EMULATION

}  // namespace oclear::cuda

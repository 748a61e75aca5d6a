// CUDA concept attention (docs/design.md#concept-attention): framework-free kernels, float32 accumulation.
//
// Forward: one block per (batch, head, tile of 16 queries); 4 warps, 4 query rows per warp. Keys
// and values are staged in shared memory 32 at a time (one key per lane), converted to float32;
// lane j computes the score of key j, the warp folds the 32 scores into its rows' online-softmax
// state (max, sum-exp) with shuffles, and every lane accumulates its Dh/32 output columns
// (o += p_j v_j, p_j broadcast by shuffle). Output and log-sum-exp are written once.
// Backward (recomputing P = exp(S - lse), FlashAttention-2 style), two kernels:
//   dq:     same grid as the forward; also writes delta_i = rowsum(dO_i * O_i) for the next kernel;
//   dk, dv: one block per (head, tile of 16 keys, batch or batch chunk); queries staged 32 at a
//           time (one per lane); a memory shared by the batch (k, v of batch 1) is summed over the
//           block's chunk of the batch in registers and added to float32 accumulators once per
//           block (atomicAdd), then cast; never expanded per batch element.
// A query row whose keys are all padding has lse = -inf, output 0 and no gradient.
// Shared-memory rows are padded to Dh + 1 floats so that lane j reading row j is conflict-free.
#include "concept_attention.cuh"

#include <algorithm>

#include "attention_device.cuh"

namespace oclear::cuda {
namespace {

using attention::allow_shared;
using attention::from_float;
using attention::kFull;
using attention::to_float;
using attention::warp_max;
using attention::warp_sum;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;
constexpr int kQueryTile = kWarps * kRowsPerWarp;  // queries per forward / dq block
constexpr int kKeyTile = 32;                        // keys staged per step (one per lane)
constexpr int kKeyRows = kWarps * kRowsPerWarp;     // keys per dk/dv block
constexpr int kQueryStage = 32;                     // queries staged per step in the dk/dv kernel

__device__ __forceinline__ float dot(const float* a, const float* b, int n) {
  float acc = 0.f;
#pragma unroll 4
  for (int d = 0; d < n; ++d) acc = fmaf(a[d], b[d], acc);
  return acc;
}

struct Params {
  int64_t batch, heads, lq, lk;
  int dh;
  bool kv_broadcast;
  int64_t q_strides[3], k_strides[3], v_strides[3];
  const bool* mask;
  float scale;
};

Params make_params(const AttentionArgs& a) {
  Params p;
  p.batch = a.batch;
  p.heads = a.heads;
  p.lq = a.lq;
  p.lk = a.lk;
  p.dh = static_cast<int>(a.dh);
  p.kv_broadcast = a.kv_broadcast;
  for (int i = 0; i < 3; ++i) {
    p.q_strides[i] = a.q_strides[i];
    p.k_strides[i] = a.kv_broadcast && i == 0 ? 0 : a.k_strides[i];
    p.v_strides[i] = a.kv_broadcast && i == 0 ? 0 : a.v_strides[i];
  }
  p.mask = a.mask;
  p.scale = a.scale;
  return p;
}

// Stages rows [j0, j0 + rows) of a (b, h) slice into shared memory as float (ld floats per row),
// times `factor`; rows past `limit` are zero.
template <typename scalar_t>
__device__ __forceinline__ void stage_rows(float* dst, int ld, const scalar_t* src, int64_t row_stride, int64_t j0,
                                           int rows, int64_t limit, int dh, float factor) {
  for (int x = threadIdx.x; x < rows * dh; x += blockDim.x) {
    const int r = x / dh, d = x - r * dh;
    const int64_t j = j0 + r;
    dst[r * ld + d] = j < limit ? factor * to_float(src[j * row_stride + d]) : 0.f;
  }
}

__device__ __forceinline__ bool is_key(const Params& p, int64_t b, int64_t j) {
  return j < p.lk && !(p.mask != nullptr && p.mask[b * p.lk + j]);
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, int kCols>
__global__ void __launch_bounds__(kThreads) forward_kernel(Params p, const scalar_t* __restrict__ q,
                                                           const scalar_t* __restrict__ k,
                                                           const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                                                           float* __restrict__ lse) {
  extern __shared__ float smem[];
  const int dh = p.dh, ld = dh + 1;
  float* qs = smem;                   // [kQueryTile][dh], pre-scaled
  float* ks = qs + kQueryTile * dh;   // [kKeyTile][ld]
  float* vs = ks + kKeyTile * ld;     // [kKeyTile][ld]
  float* bias = vs + kKeyTile * ld;   // [kKeyTile]: 0 or -inf
  const int64_t tiles = (p.lq + kQueryTile - 1) / kQueryTile;
  const int64_t tile = blockIdx.x % tiles;
  const int64_t h = (blockIdx.x / tiles) % p.heads;
  const int64_t b = blockIdx.x / (tiles * p.heads);
  const int64_t i0 = tile * kQueryTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  stage_rows(qs, dh, q + b * p.q_strides[0] + h * p.q_strides[1], p.q_strides[2], i0, kQueryTile, p.lq, dh, p.scale);
  const scalar_t* kb = k + b * p.k_strides[0] + h * p.k_strides[1];
  const scalar_t* vb = v + b * p.v_strides[0] + h * p.v_strides[1];

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kCols];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[r][c] = 0.f;
  }

  for (int64_t j0 = 0; j0 < p.lk; j0 += kKeyTile) {
    __syncthreads();  // the previous tile is consumed (and, the first time, Q is staged)
    stage_rows(ks, ld, kb, p.k_strides[2], j0, kKeyTile, p.lk, dh, 1.f);
    stage_rows(vs, ld, vb, p.v_strides[2], j0, kKeyTile, p.lk, dh, 1.f);
    if (threadIdx.x < kKeyTile) bias[threadIdx.x] = is_key(p, b, j0 + threadIdx.x) ? 0.f : -INFINITY;
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r;
      if (i0 + row >= p.lq) break;  // warp-uniform
      const float s = dot(qs + row * dh, ks + lane * ld, dh) + bias[lane];
      const float m_new = fmaxf(m[r], warp_max(s));
      if (m_new == -INFINITY) continue;  // no key for this row yet
      const float pj = s == -INFINITY ? 0.f : __expf(s - m_new);
      const float alpha = m[r] == -INFINITY ? 0.f : __expf(m[r] - m_new);
      l[r] = l[r] * alpha + warp_sum(pj);
      m[r] = m_new;
#pragma unroll
      for (int c = 0; c < kCols; ++c) acc[r][c] *= alpha;
      for (int j = 0; j < kKeyTile; ++j) {
        const float pb = __shfl_sync(kFull, pj, j);
        const float* vrow = vs + j * ld;
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          const int d = lane + 32 * c;
          if (d < dh) acc[r][c] = fmaf(pb, vrow[d], acc[r][c]);
        }
      }
    }
  }

  const int64_t bh = b * p.heads + h;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = i0 + warp * kRowsPerWarp + r;
    if (i >= p.lq) break;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;  // a row without keys returns zeros
    scalar_t* orow = out + (bh * p.lq + i) * dh;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = lane + 32 * c;
      if (d < dh) orow[d] = from_float<scalar_t>(acc[r][c] * inv);
    }
    if (lane == 0) lse[bh * p.lq + i] = l[r] > 0.f ? m[r] + __logf(l[r]) : -INFINITY;
  }
}

// ------------------------------------------------------------------------------------------------
// Backward 1: delta = rowsum(dO * O) and dq = scale * sum_j dS_ij k_j
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, int kCols>
__global__ void __launch_bounds__(kThreads)
    backward_dq_kernel(Params p, const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                       const scalar_t* __restrict__ v, const scalar_t* __restrict__ grad_out,
                       const scalar_t* __restrict__ out, const float* __restrict__ lse, float* __restrict__ delta,
                       scalar_t* __restrict__ grad_q) {
  extern __shared__ float smem[];
  const int dh = p.dh, ld = dh + 1;
  float* qs = smem;                    // [kQueryTile][dh], pre-scaled
  float* dos = qs + kQueryTile * dh;   // [kQueryTile][dh]
  float* ks = dos + kQueryTile * dh;   // [kKeyTile][ld]
  float* vs = ks + kKeyTile * ld;      // [kKeyTile][ld]
  float* bias = vs + kKeyTile * ld;    // [kKeyTile]
  const int64_t tiles = (p.lq + kQueryTile - 1) / kQueryTile;
  const int64_t tile = blockIdx.x % tiles;
  const int64_t h = (blockIdx.x / tiles) % p.heads;
  const int64_t b = blockIdx.x / (tiles * p.heads);
  const int64_t bh = b * p.heads + h;
  const int64_t i0 = tile * kQueryTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  stage_rows(qs, dh, q + b * p.q_strides[0] + h * p.q_strides[1], p.q_strides[2], i0, kQueryTile, p.lq, dh, p.scale);
  stage_rows(dos, dh, grad_out + bh * p.lq * dh, dh, i0, kQueryTile, p.lq, dh, 1.f);

  float row_lse[kRowsPerWarp], row_delta[kRowsPerWarp], acc[kRowsPerWarp][kCols];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = i0 + warp * kRowsPerWarp + r;
    float dsum = 0.f;
    if (i < p.lq) {
      const scalar_t* orow = out + (bh * p.lq + i) * dh;
      const scalar_t* grow = grad_out + (bh * p.lq + i) * dh;
      for (int d = lane; d < dh; d += 32) dsum += to_float(grow[d]) * to_float(orow[d]);
    }
    dsum = warp_sum(dsum);
    row_delta[r] = dsum;
    row_lse[r] = i < p.lq ? lse[bh * p.lq + i] : -INFINITY;
    if (i < p.lq && lane == 0) delta[bh * p.lq + i] = dsum;
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[r][c] = 0.f;
  }
  if (grad_q == nullptr) return;  // only delta was needed (block-uniform, before any barrier below)

  const scalar_t* kb = k + b * p.k_strides[0] + h * p.k_strides[1];
  const scalar_t* vb = v + b * p.v_strides[0] + h * p.v_strides[1];
  for (int64_t j0 = 0; j0 < p.lk; j0 += kKeyTile) {
    __syncthreads();
    stage_rows(ks, ld, kb, p.k_strides[2], j0, kKeyTile, p.lk, dh, 1.f);
    stage_rows(vs, ld, vb, p.v_strides[2], j0, kKeyTile, p.lk, dh, 1.f);
    if (threadIdx.x < kKeyTile) bias[threadIdx.x] = is_key(p, b, j0 + threadIdx.x) ? 0.f : -INFINITY;
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r;
      if (i0 + row >= p.lq) break;
      if (row_lse[r] == -INFINITY) continue;  // a row without keys: no gradient
      const float s = dot(qs + row * dh, ks + lane * ld, dh) + bias[lane];
      const float pj = s == -INFINITY ? 0.f : __expf(fminf(s - row_lse[r], 0.f));
      const float dp = dot(dos + row * dh, vs + lane * ld, dh);
      const float ds = pj * (dp - row_delta[r]);
      for (int j = 0; j < kKeyTile; ++j) {
        const float db = __shfl_sync(kFull, ds, j);
        const float* krow = ks + j * ld;
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          const int d = lane + 32 * c;
          if (d < dh) acc[r][c] = fmaf(db, krow[d], acc[r][c]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = i0 + warp * kRowsPerWarp + r;
    if (i >= p.lq) break;
    scalar_t* grow = grad_q + (bh * p.lq + i) * dh;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = lane + 32 * c;
      if (d < dh) grow[d] = from_float<scalar_t>(p.scale * acc[r][c]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward 2: dv_j = sum_i P_ij dO_i, dk_j = sum_i dS_ij (scale q_i), per key, over the queries of
// one batch element (per-batch keys) or of a chunk of the batch (shared keys).
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, int kCols>
__global__ void __launch_bounds__(kThreads)
    backward_dkdv_kernel(Params p, int64_t batch_chunks, const scalar_t* __restrict__ q,
                         const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                         const scalar_t* __restrict__ grad_out, const float* __restrict__ lse,
                         const float* __restrict__ delta, scalar_t* __restrict__ grad_k,
                         scalar_t* __restrict__ grad_v, float* __restrict__ acc_k, float* __restrict__ acc_v) {
  extern __shared__ float smem[];
  const int dh = p.dh, ld = dh + 1;
  float* kk = smem;                     // [kKeyRows][dh]
  float* vv = kk + kKeyRows * dh;       // [kKeyRows][dh]
  float* qs = vv + kKeyRows * dh;       // [kQueryStage][ld], pre-scaled
  float* dos = qs + kQueryStage * ld;   // [kQueryStage][ld]
  float* lse_s = dos + kQueryStage * ld;  // [kQueryStage]
  float* delta_s = lse_s + kQueryStage;   // [kQueryStage]
  const int64_t tiles = (p.lk + kKeyRows - 1) / kKeyRows;
  const int64_t tile = blockIdx.x % tiles;
  const int64_t h = (blockIdx.x / tiles) % p.heads;
  const int64_t chunk = blockIdx.x / (tiles * p.heads);
  const int64_t j0 = tile * kKeyRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool need_k = grad_k != nullptr, need_v = grad_v != nullptr;

  // Keys and values of this block: the same rows for every batch element when shared.
  const int64_t kb0 = p.kv_broadcast ? 0 : chunk;
  stage_rows(kk, dh, k + kb0 * p.k_strides[0] + h * p.k_strides[1], p.k_strides[2], j0, kKeyRows, p.lk, dh, 1.f);
  stage_rows(vv, dh, v + kb0 * p.v_strides[0] + h * p.v_strides[1], p.v_strides[2], j0, kKeyRows, p.lk, dh, 1.f);

  float dk[kRowsPerWarp][kCols], dv[kRowsPerWarp][kCols];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) dk[r][c] = dv[r][c] = 0.f;
  }

  for (int64_t b = chunk; b < p.batch; b += batch_chunks) {
    const int64_t bh = b * p.heads + h;
    for (int64_t i0 = 0; i0 < p.lq; i0 += kQueryStage) {
      __syncthreads();
      stage_rows(qs, ld, q + b * p.q_strides[0] + h * p.q_strides[1], p.q_strides[2], i0, kQueryStage, p.lq, dh,
                 p.scale);
      stage_rows(dos, ld, grad_out + bh * p.lq * dh, dh, i0, kQueryStage, p.lq, dh, 1.f);
      if (threadIdx.x < kQueryStage) {
        const int64_t i = i0 + threadIdx.x;
        lse_s[threadIdx.x] = i < p.lq ? lse[bh * p.lq + i] : -INFINITY;
        delta_s[threadIdx.x] = i < p.lq ? delta[bh * p.lq + i] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int key = warp * kRowsPerWarp + r;
        if (!is_key(p, b, j0 + key)) continue;  // padding for this batch element: no gradient
        // Lane i is query i of the stage.
        const float l = lse_s[lane];
        const float s = dot(qs + lane * ld, kk + key * dh, dh);
        const float pi = l == -INFINITY ? 0.f : __expf(fminf(s - l, 0.f));
        const float dp = dot(dos + lane * ld, vv + key * dh, dh);
        const float ds = pi * (dp - delta_s[lane]);
        for (int i = 0; i < kQueryStage; ++i) {
          const float pb = __shfl_sync(kFull, pi, i);
          const float db = __shfl_sync(kFull, ds, i);
#pragma unroll
          for (int c = 0; c < kCols; ++c) {
            const int d = lane + 32 * c;
            if (d < dh) {
              dv[r][c] = fmaf(pb, dos[i * ld + d], dv[r][c]);
              dk[r][c] = fmaf(db, qs[i * ld + d], dk[r][c]);
            }
          }
        }
      }
    }
    if (!p.kv_broadcast) break;  // per-batch keys: this block owns exactly batch element `chunk`
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t j = j0 + warp * kRowsPerWarp + r;
    if (j >= p.lk) break;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = lane + 32 * c;
      if (d >= dh) continue;
      if (p.kv_broadcast) {
        const int64_t x = (h * p.lk + j) * dh + d;
        if (need_k) atomicAdd(acc_k + x, dk[r][c]);
        if (need_v) atomicAdd(acc_v + x, dv[r][c]);
      } else {
        const int64_t x = ((chunk * p.heads + h) * p.lk + j) * dh + d;
        if (need_k) grad_k[x] = from_float<scalar_t>(dk[r][c]);
        if (need_v) grad_v[x] = from_float<scalar_t>(dv[r][c]);
      }
    }
  }
}

template <typename scalar_t>
__global__ void cast_kernel(const float* __restrict__ src, scalar_t* __restrict__ dst, int64_t n) {
  for (int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; x < n;
       x += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[x] = from_float<scalar_t>(src[x]);
  }
}

// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, int kCols>
cudaError_t forward_typed(const AttentionArgs& a, void* out, float* lse, cudaStream_t stream) {
  const Params p = make_params(a);
  const size_t bytes = sizeof(float) * (kQueryTile * p.dh + 2 * kKeyTile * (p.dh + 1) + kKeyTile);
  auto kernel = forward_kernel<scalar_t, kCols>;
  cudaError_t err = allow_shared(kernel, bytes);
  if (err != cudaSuccess) return err;
  const int64_t blocks = (p.lq + kQueryTile - 1) / kQueryTile * p.heads * p.batch;
  kernel<<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(
      p, static_cast<const scalar_t*>(a.q), static_cast<const scalar_t*>(a.k), static_cast<const scalar_t*>(a.v),
      static_cast<scalar_t*>(out), lse);
  return cudaGetLastError();
}

// A shared memory's dK, dV: the float32 accumulators cast to the input dtype.
template <typename scalar_t>
cudaError_t cast_accumulators(const Params& p, const AttentionGrads& g, cudaStream_t stream) {
  const int64_t n = p.heads * p.lk * p.dh;
  const unsigned cast_blocks = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 4096));
  if (g.grad_k != nullptr) cast_kernel<scalar_t><<<cast_blocks, 256, 0, stream>>>(g.acc_k, static_cast<scalar_t*>(g.grad_k), n);
  if (g.grad_v != nullptr) cast_kernel<scalar_t><<<cast_blocks, 256, 0, stream>>>(g.acc_v, static_cast<scalar_t*>(g.grad_v), n);
  return cudaGetLastError();
}

template <typename scalar_t, int kCols>
cudaError_t backward_typed(const AttentionArgs& a, const AttentionGrads& g, cudaStream_t stream) {
  const Params p = make_params(a);
  const auto* q = static_cast<const scalar_t*>(a.q);
  const auto* k = static_cast<const scalar_t*>(a.k);
  const auto* v = static_cast<const scalar_t*>(a.v);
  const auto* grad_out = static_cast<const scalar_t*>(g.grad_out);
  auto* grad_q = static_cast<scalar_t*>(g.grad_q);
  auto* grad_k = static_cast<scalar_t*>(g.grad_k);
  auto* grad_v = static_cast<scalar_t*>(g.grad_v);

  const size_t dq_bytes = sizeof(float) * (2 * kQueryTile * p.dh + 2 * kKeyTile * (p.dh + 1) + kKeyTile);
  auto dq_kernel = backward_dq_kernel<scalar_t, kCols>;
  cudaError_t err = allow_shared(dq_kernel, dq_bytes);
  if (err != cudaSuccess) return err;
  const int64_t dq_blocks = (p.lq + kQueryTile - 1) / kQueryTile * p.heads * p.batch;
  dq_kernel<<<static_cast<unsigned>(dq_blocks), kThreads, dq_bytes, stream>>>(
      p, q, k, v, grad_out, static_cast<const scalar_t*>(g.out), g.lse, g.delta, grad_q);
  err = cudaGetLastError();
  if (err != cudaSuccess || (grad_k == nullptr && grad_v == nullptr)) return err;

  const int64_t key_tiles = (p.lk + kKeyRows - 1) / kKeyRows;
  // Shared keys: enough batch chunks for ~1024 blocks, each summing its chunk in registers.
  const int64_t chunks =
      p.kv_broadcast ? std::max<int64_t>(1, std::min<int64_t>(p.batch, 1024 / std::max<int64_t>(1, key_tiles * p.heads)))
                     : p.batch;
  const size_t kv_bytes =
      sizeof(float) * (2 * kKeyRows * p.dh + 2 * kQueryStage * (p.dh + 1) + 2 * kQueryStage);
  auto kv_kernel = backward_dkdv_kernel<scalar_t, kCols>;
  err = allow_shared(kv_kernel, kv_bytes);
  if (err != cudaSuccess) return err;
  kv_kernel<<<static_cast<unsigned>(key_tiles * p.heads * chunks), kThreads, kv_bytes, stream>>>(
      p, chunks, q, k, v, grad_out, g.lse, g.delta, grad_k, grad_v, g.acc_k, g.acc_v);
  err = cudaGetLastError();
  if (err != cudaSuccess || !p.kv_broadcast) return err;
  return cast_accumulators<scalar_t>(p, g, stream);
}

// Dispatch on the dtype and on Dh / 32 rounded up to a power of two (columns per lane).
template <template <typename, int> class Fn, typename... Args>
cudaError_t dispatch(const AttentionArgs& a, Args&&... args) {
  const int cols = static_cast<int>((a.dh + 31) / 32);
  const int bucket = cols <= 1 ? 1 : cols <= 2 ? 2 : cols <= 4 ? 4 : 8;
  switch (a.dtype) {
    case AttentionDtype::kFloat32:
      switch (bucket) {
        case 1: return Fn<float, 1>::run(a, args...);
        case 2: return Fn<float, 2>::run(a, args...);
        case 4: return Fn<float, 4>::run(a, args...);
        default: return Fn<float, 8>::run(a, args...);
      }
    case AttentionDtype::kBFloat16:
      switch (bucket) {
        case 1: return Fn<__nv_bfloat16, 1>::run(a, args...);
        case 2: return Fn<__nv_bfloat16, 2>::run(a, args...);
        case 4: return Fn<__nv_bfloat16, 4>::run(a, args...);
        default: return Fn<__nv_bfloat16, 8>::run(a, args...);
      }
    default:
      switch (bucket) {
        case 1: return Fn<__half, 1>::run(a, args...);
        case 2: return Fn<__half, 2>::run(a, args...);
        case 4: return Fn<__half, 4>::run(a, args...);
        default: return Fn<__half, 8>::run(a, args...);
      }
  }
}

template <typename scalar_t, int kCols>
struct Forward {
  static cudaError_t run(const AttentionArgs& a, void* out, float* lse, cudaStream_t stream) {
    return forward_typed<scalar_t, kCols>(a, out, lse, stream);
  }
};

template <typename scalar_t, int kCols>
struct Backward {
  static cudaError_t run(const AttentionArgs& a, const AttentionGrads& g, cudaStream_t stream) {
    return backward_typed<scalar_t, kCols>(a, g, stream);
  }
};

}  // namespace

cudaError_t concept_attention_forward(const AttentionArgs& args, void* out, float* lse, cudaStream_t stream) {
  if (args.dh < 1 || args.dh > 256) return cudaErrorInvalidValue;
  if (args.tensor_cores && concept_attention_tc_eligible(args)) return concept_attention_forward_tc(args, out, lse, stream);
  return dispatch<Forward>(args, out, lse, stream);
}

cudaError_t concept_attention_backward(const AttentionArgs& args, const AttentionGrads& grads, cudaStream_t stream) {
  if (args.dh < 1 || args.dh > 256) return cudaErrorInvalidValue;
  if (args.tensor_cores && concept_attention_tc_eligible(args)) {
    const cudaError_t err = concept_attention_backward_tc(args, grads, stream);
    if (err != cudaSuccess || !args.kv_broadcast) return err;
    const Params p = make_params(args);
    return args.dtype == AttentionDtype::kBFloat16 ? cast_accumulators<__nv_bfloat16>(p, grads, stream)
                                                    : cast_accumulators<__half>(p, grads, stream);
  }
  return dispatch<Backward>(args, grads, stream);
}

}  // namespace oclear::cuda

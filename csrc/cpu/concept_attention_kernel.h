// CPU concept attention, the per-instruction-set part: a small register-blocked GEMM and the
// per-(batch, head) forward and backward tile programs.
//
// NO include guard, on purpose: concept_attention.cpp includes this file once per instruction set
// (AVX-512, AVX2 + FMA, the compiler's baseline), each time inside its own namespace and between
// `#pragma GCC target` push/pop, with kVectorBytes defined; the runtime picks one (torch's own CPU
// capability, so ATEN_CPU_CAPABILITY=default selects the baseline as it does for torch's kernels).
// Everything it needs (ATen, <cmath>, fast_exp, AttentionProblem) is included before.
//
// Why hand-blocked: the shapes are tiny (Lq ~ 1..64 queries, Lk ~ 32..512 keys, Dh ~ 64) and
// there are B x H of them. A BLAS call per tile costs more in dispatch than the tile's arithmetic,
// and a batched GEMM needs the scores materialised in memory between GEMM and softmax. Here each
// (b, h) runs start to finish on one core with every operand in L1/L2: S = Q K^T one key block at a
// time, online softmax, O += P V, all through one micro-kernel C (+)= A B with A read as broadcast
// scalars and B, C as vectors (the GEMM "outer product" form that vectorises without horizontal sums).
// That form wants B row-major in the output's columns: K^T (for S) and V^T (for dP in the backward)
// are laid out once per (b, h), or once per head for a memory shared over the batch, through
// register transposes; Q, K, V, dO rows are read in place when they are acc_t rows of a whole number
// of vectors (else copied, converted and zero-padded). A transposed A operand (P^T, dS^T) is free.

template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(kVectorBytes)));
  typedef float U __attribute__((vector_size(kVectorBytes), aligned(4), may_alias));  // unaligned
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(kVectorBytes)));
  typedef double U __attribute__((vector_size(kVectorBytes), aligned(8), may_alias));
};

template <typename T>
constexpr int64_t kLanes = kVectorBytes / static_cast<int64_t>(sizeof(T));
// Micro-tile of C: kRows x (kVecs vectors). 4 x 4 zmm = 16 accumulators of AVX-512's 32
// registers; with 16 registers (AVX2, SSE) 4 x 2 = 8 accumulators leave room for the B vectors.
constexpr int kRows = 4;
constexpr int kVecs = kVectorBytes >= 64 ? 4 : 2;
// Keys per block (the online softmax's step) and queries per tile: a 64 x 64 score tile in L1.
constexpr int64_t kKeyBlock = 64;
constexpr int64_t kQueryTile = 64;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[R x NV*L] (+)= A[R x k] B[k x NV*L]; A(r, p) = a[r * lda + p * aps] (any layout: A is read as
// broadcast scalars, so a transposed A costs nothing), B and C row-major (ldb, ldc).
template <typename T, int R, int NV, bool kAccumulate>
inline void micro_tile(int64_t k, const T* __restrict a, int64_t lda, int64_t aps, const T* __restrict b,
                       int64_t ldb, T* __restrict c, int64_t ldc) {
  using V = typename Simd<T>::V;
  using U = typename Simd<T>::U;
  constexpr int64_t L = kLanes<T>;
  V acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      if constexpr (kAccumulate) {
        acc[r][v] = *reinterpret_cast<const U*>(c + r * ldc + v * L);
      } else {
        acc[r][v] = V{};
      }
    }
  }
  for (int64_t p = 0; p < k; ++p) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = *reinterpret_cast<const U*>(b + p * ldb + v * L);
    for (int r = 0; r < R; ++r) {
      const T ar = a[r * lda + p * aps];
      for (int v = 0; v < NV; ++v) acc[r][v] += ar * bv[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) *reinterpret_cast<U*>(c + r * ldc + v * L) = acc[r][v];
  }
}

template <typename T, int NV, bool kAccumulate>
inline void gemm_columns(int64_t m, int64_t k, const T* a, int64_t lda, int64_t aps, const T* b, int64_t ldb,
                         T* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + kRows <= m; i += kRows) {
    micro_tile<T, kRows, NV, kAccumulate>(k, a + i * lda, lda, aps, b, ldb, c + i * ldc, ldc);
  }
  for (; i < m; ++i) micro_tile<T, 1, NV, kAccumulate>(k, a + i * lda, lda, aps, b, ldb, c + i * ldc, ldc);
}

// C[m x n] (+)= A[m x k] B[k x n], n a multiple of the vector length (callers pad with zeros);
// A(r, p) = a[r * lda + p * aps].
template <typename T, bool kAccumulate>
void gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, int64_t aps, const T* b, int64_t ldb, T* c,
          int64_t ldc) {
  constexpr int64_t L = kLanes<T>;
  int64_t j = 0;
  for (; j + kVecs * L <= n; j += kVecs * L) {
    gemm_columns<T, kVecs, kAccumulate>(m, k, a, lda, aps, b + j, ldb, c + j, ldc);
  }
  if constexpr (kVecs > 2) {
    if (j + 2 * L <= n) {
      gemm_columns<T, 2, kAccumulate>(m, k, a, lda, aps, b + j, ldb, c + j, ldc);
      j += 2 * L;
    }
  }
  if (j < n) gemm_columns<T, 1, kAccumulate>(m, k, a, lda, aps, b + j, ldb, c + j, ldc);
}

template <typename T>
inline void gemm_into(bool accumulate, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, int64_t aps,
                      const T* b, int64_t ldb, T* c, int64_t ldc) {
  if (accumulate) {
    gemm<T, true>(m, n, k, a, lda, aps, b, ldb, c, ldc);
  } else {
    gemm<T, false>(m, n, k, a, lda, aps, b, ldb, c, ldc);
  }
}

// exp(x) for x <= 0, exactly 0 at x = -inf (a masked key must carry no weight at all, not 1e-38).
inline float exp_nonpositive(float x) { return x < -87.0f ? 0.0f : fast_exp(x); }
inline double exp_nonpositive(double x) { return std::exp(x); }

// row[j] = scale * row[j] + bias[j] for j < n (n a multiple of the vector length); returns the max
// of the row. Written on vectors: a scalar max reduction is a latency chain the compiler does not
// vectorise.
template <typename T>
inline T scale_bias_max(T* row, T scale, const T* bias, int64_t n) {
  using V = typename Simd<T>::V;
  using U = typename Simd<T>::U;
  constexpr int64_t L = kLanes<T>;
  V mx = V{} + T(-INFINITY);
  for (int64_t j = 0; j < n; j += L) {
    const V x = scale * *reinterpret_cast<const U*>(row + j) + *reinterpret_cast<const U*>(bias + j);
    *reinterpret_cast<U*>(row + j) = x;
    mx = x > mx ? x : mx;
  }
  T out = mx[0];
  for (int64_t l = 1; l < L; ++l) out = std::max(out, T(mx[l]));
  return out;
}

// The next (b, h)'s inputs, pulled towards L2 a few lines at a time while the current one computes
// (advance() from its inner loops): a burst of hundreds of prefetches at once mostly stalls on the
// core's miss buffers instead of overlapping with arithmetic.
class Prefetcher {
 public:
  void add(const void* base, int64_t rows, int64_t row_stride_bytes, int64_t row_bytes) {
    if (count_ == kMaxRanges || rows <= 0) return;
    ranges_[count_++] = Range{static_cast<const char*>(base), rows, row_stride_bytes, (row_bytes + 63) / 64};
    total_ += rows * ((row_bytes + 63) / 64);
  }
  int64_t total() const { return total_; }
  // Issues prefetches up to line `upto` (of total()).
  void advance(int64_t upto) {
    while (issued_ < upto && range_ < count_) {
      const Range& r = ranges_[range_];
      __builtin_prefetch(r.base + row_ * r.stride + line_ * 64, 0, 2);
      ++issued_;
      if (++line_ == r.lines) {
        line_ = 0;
        if (++row_ == r.rows) {
          row_ = 0;
          ++range_;
        }
      }
    }
  }

 private:
  struct Range {
    const char* base;
    int64_t rows, stride, lines;
  };
  static constexpr int kMaxRanges = 5;
  Range ranges_[kMaxRanges];
  int count_ = 0, range_ = 0;
  int64_t total_ = 0, issued_ = 0, row_ = 0, line_ = 0;
};

// Padded sizes of one problem: keys to a multiple of the vector length (padding keys are masked),
// Dh to a multiple of the vector length (padding columns are zero and contribute nothing).
template <typename T>
struct Padded {
  int64_t dh;  // Dh rounded up
  int64_t lk;  // Lk rounded up
  Padded(int64_t lk_, int64_t dh_) : dh(round_up(dh_, kLanes<T>)), lk(round_up(lk_, kLanes<T>)) {}
  int64_t block_width(int64_t j0) const { return std::min(kKeyBlock, lk - j0); }
};

// Rows of a tensor can serve as a GEMM's B operand in place when they are acc_t and Dh is a whole
// number of vectors (no padding columns needed).
template <typename scalar_t, typename T>
constexpr bool rows_in_place_type = std::is_same_v<scalar_t, T>;
template <typename scalar_t, typename T>
inline bool rows_in_place(int64_t dh) {
  return rows_in_place_type<scalar_t, T> && dh % kLanes<T> == 0;
}

#if defined(__GNUC__) && !defined(__clang__)
#define OCLEAR_VECTOR_TRANSPOSE 1
template <typename T>
struct SimdIndex;
template <>
struct SimdIndex<float> {
  typedef int32_t M __attribute__((vector_size(kVectorBytes)));
};
template <>
struct SimdIndex<double> {
  typedef int64_t M __attribute__((vector_size(kVectorBytes)));
};

// Shuffle masks of stage S as compile-time constants (a runtime mask costs a broadcast and a
// mask register per shuffle): lo takes row i's element k, or row i+S's element k-S where bit S of
// k is set; hi the mirror.
template <typename T, int S, int... K>
inline typename SimdIndex<T>::M stage_mask_lo(std::integer_sequence<int, K...>) {
  constexpr int L = static_cast<int>(kLanes<T>);
  return typename SimdIndex<T>::M{((K & S) ? L + K - S : K)...};
}
template <typename T, int S, int... K>
inline typename SimdIndex<T>::M stage_mask_hi(std::integer_sequence<int, K...>) {
  return typename SimdIndex<T>::M{((K & S) ? static_cast<int>(kLanes<T>) + K : K + S)...};
}

// Stage S swaps bit S of the row index with bit S of the column index where they differ; all
// stages together swap row and column.
template <typename T, int S>
inline void transpose_stages(typename Simd<T>::V* r) {
  constexpr int L = static_cast<int>(kLanes<T>);
  if constexpr (S < L) {
    using V = typename Simd<T>::V;
    const auto lo = stage_mask_lo<T, S>(std::make_integer_sequence<int, L>{});
    const auto hi = stage_mask_hi<T, S>(std::make_integer_sequence<int, L>{});
#pragma GCC unroll 16
    for (int i = 0; i < L; ++i) {
      if (i & S) continue;
      const V a = r[i], b = r[i + S];
      r[i] = __builtin_shuffle(a, b, lo);
      r[i + S] = __builtin_shuffle(a, b, hi);
    }
    transpose_stages<T, 2 * S>(r);
  }
}

// dst (L x L, ld_dst) = src^T (L x L, ld_src) in registers: log2(L) stages of two-input shuffles.
template <typename T>
inline void transpose_tile(const T* src, int64_t ld_src, T* dst, int64_t ld_dst) {
  using V = typename Simd<T>::V;
  using U = typename Simd<T>::U;
  constexpr int L = static_cast<int>(kLanes<T>);
  V r[L];
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i) r[i] = *reinterpret_cast<const U*>(src + i * ld_src);
  transpose_stages<T, 1>(r);
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i) *reinterpret_cast<U*>(dst + i * ld_dst) = r[i];
}
#endif

// K^T in key blocks: block at key j0 (width w) is a (Dh_p x w) row-major matrix at dst + j0 * Dh_p.
// Full L x L tiles of acc_t inputs go through register transposes; edges and converted dtypes
// element by element, zero past Lk and Dh.
template <typename scalar_t, typename T>
void layout_transposed(const scalar_t* src, int64_t row_stride, int64_t lk, int64_t dh, const Padded<T>& pad,
                       T* dst) {
  constexpr int64_t L = kLanes<T>;
  for (int64_t j0 = 0; j0 < pad.lk; j0 += kKeyBlock) {
    const int64_t w = pad.block_width(j0);
    T* block = dst + j0 * pad.dh;
    for (int64_t jj = 0; jj < w; jj += L) {
      for (int64_t dd = 0; dd < pad.dh; dd += L) {
        const int64_t j_first = j0 + jj;
#ifdef OCLEAR_VECTOR_TRANSPOSE
        if constexpr (rows_in_place_type<scalar_t, T>) {
          if (j_first + L <= lk && dd + L <= dh) {
            transpose_tile(src + j_first * row_stride + dd, row_stride, block + dd * w + jj, w);
            continue;
          }
        }
#endif
        for (int64_t d = 0; d < L; ++d) {
          T* out = block + (dd + d) * w + jj;
          for (int64_t j = 0; j < L; ++j) {
            const bool inside = j_first + j < lk && dd + d < dh;
            out[j] = inside ? static_cast<T>(src[(j_first + j) * row_stride + dd + d]) : T(0);
          }
        }
      }
    }
  }
}

// Rows padded to Dh_p columns, Lk_p rows (padding is zero): dst[j * Dh_p + d].
template <typename scalar_t, typename T>
void layout_rows(const scalar_t* src, int64_t row_stride, int64_t rows, int64_t rows_padded, int64_t dh,
                 int64_t dh_padded, T factor, T* dst) {
  for (int64_t j = 0; j < rows; ++j) {
    const scalar_t* row = src + j * row_stride;
    T* out = dst + j * dh_padded;
#pragma omp simd
    for (int64_t d = 0; d < dh; ++d) out[d] = factor * static_cast<T>(row[d]);
    std::fill(out + dh, out + dh_padded, T(0));
  }
  std::fill(dst + rows * dh_padded, dst + rows_padded * dh_padded, T(0));
}

// 0 for a key that takes part, -inf for a padding key or a key past Lk.
template <typename T>
void key_bias(const bool* mask_row, int64_t lk, int64_t lk_padded, T* bias) {
  for (int64_t j = 0; j < lk_padded; ++j) {
    const bool padding = j >= lk || (mask_row != nullptr && mask_row[j]);
    bias[j] = padding ? T(-INFINITY) : T(0);
  }
}

template <typename scalar_t>
const scalar_t* head_ptr(const scalar_t* base, const Strides4& s, int64_t b, int64_t h) {
  return base + b * s.batch + h * s.head;
}

// ---------------------------------------------------------------------------------------------
// Forward of one (b, h): out (Lq x Dh, contiguous) and lse (Lq).
// kt: K^T blocks, vs: V rows (both Padded layouts).
// ---------------------------------------------------------------------------------------------
template <typename T>
struct ForwardScratch {
  std::vector<T> q, s, o, m, l, alpha, bias, kt, vs;
  ForwardScratch(const Padded<T>& pad, bool own_keys, bool v_in_place)
      : q(kQueryTile * pad.dh), s(kQueryTile * kKeyBlock), o(kQueryTile * pad.dh), m(kQueryTile),
        l(kQueryTile), alpha(kQueryTile), bias(pad.lk), kt(own_keys ? pad.lk * pad.dh : 0),
        vs(own_keys && !v_in_place ? pad.lk * pad.dh : 0) {}
};

template <typename scalar_t, typename T>
void forward_head(const AttentionProblem<scalar_t>& p, const Padded<T>& pad, int64_t b, int64_t h, const T* kt,
                  const T* vs, int64_t ldv, scalar_t* out, T* lse, ForwardScratch<T>& w, Prefetcher& next) {
  const int64_t steps = p.lq * ((pad.lk + kKeyBlock - 1) / kKeyBlock);
  int64_t step = 0;
  const int64_t dh = p.dh, dhp = pad.dh;
  key_bias(p.mask ? p.mask + b * p.lk : nullptr, p.lk, pad.lk, w.bias.data());
  const scalar_t* q = head_ptr(p.q, p.q_strides, b, h);
  const bool q_in_place = rows_in_place<scalar_t, T>(dh);
  const T scale = static_cast<T>(p.scale);
  T* s = w.s.data();
  T* o = w.o.data();
  for (int64_t i0 = 0; i0 < p.lq; i0 += kQueryTile) {
    const int64_t tq = std::min(kQueryTile, p.lq - i0);
    // Q in place when its rows already fit (the scale is applied to the scores).
    const T* qa = w.q.data();
    int64_t ldq = dhp;
    if (q_in_place) {
      qa = reinterpret_cast<const T*>(q) + i0 * p.q_strides.row;
      ldq = p.q_strides.row;
    } else {
      layout_rows(q + i0 * p.q_strides.row, p.q_strides.row, tq, tq, dh, dhp, T(1), w.q.data());
    }
    std::fill(w.m.begin(), w.m.begin() + tq, T(-INFINITY));
    std::fill(w.l.begin(), w.l.begin() + tq, T(0));
    for (int64_t j0 = 0; j0 < pad.lk; j0 += kKeyBlock) {
      const int64_t kw = pad.block_width(j0);
      gemm<T, false>(tq, kw, dhp, qa, ldq, 1, kt + j0 * dhp, kw, s, kKeyBlock);
      const T* bias = w.bias.data() + j0;
      for (int64_t i = 0; i < tq; ++i) {
        T* row = s + i * kKeyBlock;
        next.advance(next.total() * ++step / steps);
        const T mx = std::max(w.m[i], scale_bias_max(row, scale, bias, kw));
        if (mx == T(-INFINITY)) {  // no key of this row so far: P row = 0, state unchanged
          std::fill(row, row + kw, T(0));
          w.alpha[i] = T(1);
          continue;
        }
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < kw; ++j) {
          const T e = exp_nonpositive(row[j] - mx);
          row[j] = e;
          sum += e;
        }
        w.alpha[i] = exp_nonpositive(w.m[i] - mx);  // 0 while the row had no key yet
        w.l[i] = w.l[i] * w.alpha[i] + sum;
        w.m[i] = mx;
      }
      if (j0 > 0) {
        for (int64_t i = 0; i < tq; ++i) {
          const T a = w.alpha[i];
          if (a == T(1)) continue;
          T* orow = o + i * dhp;
#pragma omp simd
          for (int64_t d = 0; d < dhp; ++d) orow[d] *= a;
        }
      }
      // Only the block's real keys: P is 0 past Lk, and V's rows there may not exist (read in place).
      gemm_into<T>(j0 > 0, tq, dhp, std::min(kw, p.lk - j0), s, kKeyBlock, 1, vs + j0 * ldv, ldv, o, dhp);
    }
    for (int64_t i = 0; i < tq; ++i) {
      const T l = w.l[i];
      const T inv = l > T(0) ? T(1) / l : T(0);  // a row without keys returns zeros
      const T* orow = o + i * dhp;
      scalar_t* dst = out + (i0 + i) * dh;
#pragma omp simd
      for (int64_t d = 0; d < dh; ++d) dst[d] = static_cast<scalar_t>(orow[d] * inv);
      lse[i0 + i] = l > T(0) ? w.m[i] + std::log(l) : T(-INFINITY);
    }
  }
}

template <typename scalar_t>
void add_inputs(Prefetcher& pf, const AttentionProblem<scalar_t>& p, int64_t b, int64_t h) {
  const int64_t e = sizeof(scalar_t);
  pf.add(head_ptr(p.q, p.q_strides, b, h), p.lq, p.q_strides.row * e, p.dh * e);
  if (!p.kv_broadcast) {
    pf.add(head_ptr(p.k, p.k_strides, b, h), p.lk, p.k_strides.row * e, p.dh * e);
    pf.add(head_ptr(p.v, p.v_strides, b, h), p.lk, p.v_strides.row * e, p.dh * e);
  }
}


template <typename scalar_t>
void forward(const AttentionProblem<scalar_t>& p, scalar_t* out, at::opmath_type<scalar_t>* lse) {
  using T = at::opmath_type<scalar_t>;
  const Padded<T> pad(p.lk, p.dh);
  // A memory shared by the batch (k, v batch 1) is laid out once per head, not once per (b, h).
  // V rows are read in place when they already are acc_t rows of a vector multiple.
  const bool v_in_place = rows_in_place<scalar_t, T>(p.dh);
  std::vector<T> shared_kt, shared_vs;
  if (p.kv_broadcast) {
    shared_kt.resize(p.heads * pad.lk * pad.dh);
    if (!v_in_place) shared_vs.resize(p.heads * pad.lk * pad.dh);
    at::parallel_for(0, p.heads, 1, [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h) {
        layout_transposed(head_ptr(p.k, p.k_strides, 0, h), p.k_strides.row, p.lk, p.dh, pad,
                          shared_kt.data() + h * pad.lk * pad.dh);
        if (!v_in_place) {
          layout_rows(head_ptr(p.v, p.v_strides, 0, h), p.v_strides.row, p.lk, pad.lk, p.dh, pad.dh, T(1),
                      shared_vs.data() + h * pad.lk * pad.dh);
        }
      }
    });
  }
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t bh0, int64_t bh1) {
    ForwardScratch<T> w(pad, !p.kv_broadcast, v_in_place);
    for (int64_t bh = bh0; bh < bh1; ++bh) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      Prefetcher next;
      if (bh + 1 < bh1) add_inputs(next, p, (bh + 1) / p.heads, (bh + 1) % p.heads);
      const T* kt;
      const T* vs;
      int64_t ldv = pad.dh;
      if (p.kv_broadcast) {
        kt = shared_kt.data() + h * pad.lk * pad.dh;
        vs = v_in_place ? nullptr : shared_vs.data() + h * pad.lk * pad.dh;
      } else {
        layout_transposed(head_ptr(p.k, p.k_strides, b, h), p.k_strides.row, p.lk, p.dh, pad, w.kt.data());
        if (!v_in_place) {
          layout_rows(head_ptr(p.v, p.v_strides, b, h), p.v_strides.row, p.lk, pad.lk, p.dh, pad.dh, T(1),
                      w.vs.data());
        }
        kt = w.kt.data();
        vs = w.vs.data();
      }
      if (v_in_place) {
        vs = reinterpret_cast<const T*>(head_ptr(p.v, p.v_strides, b, h));
        ldv = p.v_strides.row;
      }
      forward_head(p, pad, b, h, kt, vs, ldv, out + bh * p.lq * p.dh, lse + bh * p.lq, w, next);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward of one (b, h), FlashAttention-2 style: per query tile, recompute P = exp(S - lse) block
// by block, then
//   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ += dS K,  dK += dS^T Q
// with S = scale Q K^T and the scale folded into dS (so dQ and dK need no extra pass). dK, dV
// accumulate over the query tiles (and, for a shared memory, over the batch) in acc_t.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct KeyLayouts {
  const T* kt;    // K^T blocks
  const T* ks;    // K rows (ld_ks apart)
  int64_t ld_ks;
  const T* vt;    // V^T blocks
};

template <typename T>
struct BackwardScratch {
  std::vector<T> q, dout, delta, lse, p, dp, dq, bias, kt, ks, vt;
  BackwardScratch(const Padded<T>& pad, bool own_keys, bool k_in_place)
      : q(kQueryTile * pad.dh), dout(kQueryTile * pad.dh), delta(kQueryTile), lse(kQueryTile),
        p(kQueryTile * kKeyBlock), dp(kQueryTile * kKeyBlock), dq(kQueryTile * pad.dh), bias(pad.lk),
        kt(own_keys ? pad.lk * pad.dh : 0), ks(own_keys && !k_in_place ? pad.lk * pad.dh : 0),
        vt(own_keys ? pad.lk * pad.dh : 0) {}
};

// dk, dv: accumulators with row stride ld_dkv (null when not needed). `direct`: they are the output
// rows themselves (acc_t, Lk x Dh exactly): the first query tile overwrites them and rows past Lk
// are never touched; otherwise they are zeroed Lk_p x Dh_p scratch that is only added to.
template <typename scalar_t, typename T>
void backward_head(const AttentionProblem<scalar_t>& p, const BackwardIO<scalar_t>& io, const Padded<T>& pad,
                   int64_t b, int64_t h, const KeyLayouts<T>& keys, T* dk, T* dv, int64_t ld_dkv, bool direct,
                   BackwardScratch<T>& w, Prefetcher& next) {
  const int64_t steps = p.lq * ((pad.lk + kKeyBlock - 1) / kKeyBlock);
  int64_t step = 0;
  const int64_t dh = p.dh, dhp = pad.dh;
  const int64_t bh = b * p.heads + h;
  const bool need_ds = io.grad_q != nullptr || dk != nullptr;
  key_bias(p.mask ? p.mask + b * p.lk : nullptr, p.lk, pad.lk, w.bias.data());
  const scalar_t* q = head_ptr(p.q, p.q_strides, b, h);
  const scalar_t* dout = io.grad_out + bh * p.lq * dh;
  const scalar_t* out = io.out + bh * p.lq * dh;
  const T* lse = io.lse + bh * p.lq;
  const bool in_place = rows_in_place<scalar_t, T>(dh);
  const T scale = static_cast<T>(p.scale);
  T* pm = w.p.data();
  T* dp = w.dp.data();
  T* dq = w.dq.data();
  for (int64_t i0 = 0; i0 < p.lq; i0 += kQueryTile) {
    const int64_t tq = std::min(kQueryTile, p.lq - i0);
    // Q and dO in place when their rows already fit; the scale goes into S and dS instead.
    const T* qa = w.q.data();
    const T* doa = w.dout.data();
    int64_t ldq = dhp, lddo = dhp;
    if (in_place) {
      qa = reinterpret_cast<const T*>(q) + i0 * p.q_strides.row;
      ldq = p.q_strides.row;
      doa = reinterpret_cast<const T*>(dout) + i0 * dh;
      lddo = dh;
    } else {
      layout_rows(q + i0 * p.q_strides.row, p.q_strides.row, tq, tq, dh, dhp, T(1), w.q.data());
      layout_rows(dout + i0 * dh, dh, tq, tq, dh, dhp, T(1), w.dout.data());
    }
    const bool accumulate_kv = !(direct && i0 == 0);
    for (int64_t i = 0; i < tq; ++i) {
      const scalar_t* orow = out + (i0 + i) * dh;
      const T* grow = doa + i * lddo;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < dh; ++d) acc += grow[d] * static_cast<T>(orow[d]);
      w.delta[i] = acc;
      w.lse[i] = lse[i0 + i];
    }
    for (int64_t j0 = 0; j0 < pad.lk; j0 += kKeyBlock) {
      const int64_t kw = pad.block_width(j0);
      const int64_t real = std::min(kw, p.lk - j0);  // keys of the block before the padding
      const int64_t kv_rows = direct ? real : kw;
      gemm<T, false>(tq, kw, dhp, qa, ldq, 1, keys.kt + j0 * dhp, kw, pm, kKeyBlock);
      const T* bias = w.bias.data() + j0;
      for (int64_t i = 0; i < tq; ++i) {
        T* row = pm + i * kKeyBlock;
        next.advance(next.total() * ++step / steps);
        const T l = w.lse[i];
        if (l == T(-INFINITY)) {  // a row without keys: no probability, no gradient
          std::fill(row, row + kw, T(0));
          continue;
        }
#pragma omp simd
        for (int64_t j = 0; j < kw; ++j) row[j] = exp_nonpositive(std::min(scale * row[j] + bias[j] - l, T(0)));
      }
      if (dv != nullptr) {  // dV += P^T dO
        gemm_into<T>(accumulate_kv, kv_rows, dhp, tq, pm, 1, kKeyBlock, doa, lddo, dv + j0 * ld_dkv, ld_dkv);
      }
      if (!need_ds) continue;
      gemm<T, false>(tq, kw, dhp, doa, lddo, 1, keys.vt + j0 * dhp, kw, dp, kKeyBlock);
      for (int64_t i = 0; i < tq; ++i) {  // dS, times the scale: dQ = dS' K, dK = dS'^T Q
        T* dsrow = dp + i * kKeyBlock;
        const T* prow = pm + i * kKeyBlock;
        const T delta = w.delta[i];
#pragma omp simd
        for (int64_t j = 0; j < kw; ++j) dsrow[j] = scale * prow[j] * (dsrow[j] - delta);
      }
      if (io.grad_q != nullptr) {
        gemm_into<T>(j0 > 0, tq, dhp, real, dp, kKeyBlock, 1, keys.ks + j0 * keys.ld_ks, keys.ld_ks, dq, dhp);
      }
      if (dk != nullptr) {
        gemm_into<T>(accumulate_kv, kv_rows, dhp, tq, dp, 1, kKeyBlock, qa, ldq, dk + j0 * ld_dkv, ld_dkv);
      }
    }
    if (io.grad_q != nullptr) {
      for (int64_t i = 0; i < tq; ++i) {
        const T* src = dq + i * dhp;
        scalar_t* dst = io.grad_q + (bh * p.lq + i0 + i) * dh;
#pragma omp simd
        for (int64_t d = 0; d < dh; ++d) dst[d] = static_cast<scalar_t>(src[d]);
      }
    }
  }
}

// Writes rows (Lk x Dh) of an acc_t layout (Lk_p x Dh_p) into a scalar_t tensor.
template <typename scalar_t, typename T>
void store_rows(const T* src, int64_t lk, int64_t dh, int64_t dh_padded, scalar_t* dst) {
  for (int64_t j = 0; j < lk; ++j) {
#pragma omp simd
    for (int64_t d = 0; d < dh; ++d) dst[j * dh + d] = static_cast<scalar_t>(src[j * dh_padded + d]);
  }
}

template <typename scalar_t>
void backward(const AttentionProblem<scalar_t>& p, const BackwardIO<scalar_t>& io) {
  using T = at::opmath_type<scalar_t>;
  const Padded<T> pad(p.lk, p.dh);
  const int64_t head_size = pad.lk * pad.dh;
  const bool need_k = io.grad_k != nullptr, need_v = io.grad_v != nullptr;
  if (io.grad_q == nullptr && !need_k && !need_v) return;

  // K rows are read in place when they already are acc_t rows of a vector multiple.
  const bool k_in_place = rows_in_place<scalar_t, T>(p.dh);
  std::vector<T> shared_kt, shared_ks, shared_vt;
  if (p.kv_broadcast) {
    shared_kt.resize(p.heads * head_size);
    if (!k_in_place) shared_ks.resize(p.heads * head_size);
    shared_vt.resize(p.heads * head_size);
    at::parallel_for(0, p.heads, 1, [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h) {
        const scalar_t* k = head_ptr(p.k, p.k_strides, 0, h);
        layout_transposed(k, p.k_strides.row, p.lk, p.dh, pad, shared_kt.data() + h * head_size);
        if (!k_in_place) {
          layout_rows(k, p.k_strides.row, p.lk, pad.lk, p.dh, pad.dh, T(1), shared_ks.data() + h * head_size);
        }
        layout_transposed(head_ptr(p.v, p.v_strides, 0, h), p.v_strides.row, p.lk, p.dh, pad,
                          shared_vt.data() + h * head_size);
      }
    });
  }

  // A shared memory's dK, dV are sums over the batch: the (b, h) range is cut into `parts`
  // contiguous pieces (one per thread), each with its own acc_t partial, added up at the end in a
  // fixed order. Never a (B, H, Lk, Dh) intermediate. Per-batch keys write their gradients directly.
  const int64_t total = p.batch * p.heads;
  const int64_t parts = p.kv_broadcast ? std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total)) : total;
  std::vector<T> partial_dk(p.kv_broadcast && need_k ? parts * p.heads * head_size : 0);
  std::vector<T> partial_dv(p.kv_broadcast && need_v ? parts * p.heads * head_size : 0);

  at::parallel_for(0, parts, 1, [&](int64_t part0, int64_t part1) {
    BackwardScratch<T> w(pad, !p.kv_broadcast, k_in_place);
    std::vector<T> own_dk(!p.kv_broadcast && !k_in_place && need_k ? head_size : 0);
    std::vector<T> own_dv(!p.kv_broadcast && !k_in_place && need_v ? head_size : 0);
    for (int64_t part = part0; part < part1; ++part) {
      const int64_t bh0 = p.kv_broadcast ? part * total / parts : part;
      const int64_t bh1 = p.kv_broadcast ? (part + 1) * total / parts : part + 1;
      for (int64_t bh = bh0; bh < bh1; ++bh) {
        const int64_t b = bh / p.heads, h = bh % p.heads;
        Prefetcher next;
        if (bh + 1 < bh1) {
          add_inputs(next, p, (bh + 1) / p.heads, (bh + 1) % p.heads);
          const int64_t row_bytes = p.dh * static_cast<int64_t>(sizeof(scalar_t));
          next.add(io.grad_out + (bh + 1) * p.lq * p.dh, p.lq, row_bytes, row_bytes);
          next.add(io.out + (bh + 1) * p.lq * p.dh, p.lq, row_bytes, row_bytes);
        }
        KeyLayouts<T> keys;
        T* dk = nullptr;
        T* dv = nullptr;
        int64_t ld_dkv = pad.dh;
        bool direct = false;
        if (p.kv_broadcast) {
          keys = {shared_kt.data() + h * head_size, k_in_place ? nullptr : shared_ks.data() + h * head_size,
                  pad.dh, shared_vt.data() + h * head_size};
          if (need_k) dk = partial_dk.data() + (part * p.heads + h) * head_size;
          if (need_v) dv = partial_dv.data() + (part * p.heads + h) * head_size;
        } else {
          const scalar_t* k = head_ptr(p.k, p.k_strides, b, h);
          layout_transposed(k, p.k_strides.row, p.lk, p.dh, pad, w.kt.data());
          if (!k_in_place) layout_rows(k, p.k_strides.row, p.lk, pad.lk, p.dh, pad.dh, T(1), w.ks.data());
          layout_transposed(head_ptr(p.v, p.v_strides, b, h), p.v_strides.row, p.lk, p.dh, pad, w.vt.data());
          keys = {w.kt.data(), w.ks.data(), pad.dh, w.vt.data()};
          direct = k_in_place;  // acc_t rows of a vector multiple: accumulate into the outputs themselves
          if (direct) {
            ld_dkv = p.dh;
            if (need_k) dk = reinterpret_cast<T*>(io.grad_k + bh * p.lk * p.dh);
            if (need_v) dv = reinterpret_cast<T*>(io.grad_v + bh * p.lk * p.dh);
          } else {
            if (need_k) {
              dk = own_dk.data();
              std::fill(own_dk.begin(), own_dk.end(), T(0));
            }
            if (need_v) {
              dv = own_dv.data();
              std::fill(own_dv.begin(), own_dv.end(), T(0));
            }
          }
        }
        if (k_in_place) {
          keys.ks = reinterpret_cast<const T*>(head_ptr(p.k, p.k_strides, b, h));
          keys.ld_ks = p.k_strides.row;
        }
        backward_head(p, io, pad, b, h, keys, dk, dv, ld_dkv, direct, w, next);
        if (!p.kv_broadcast && !direct) {
          if (need_k) store_rows(dk, p.lk, p.dh, pad.dh, io.grad_k + bh * p.lk * p.dh);
          if (need_v) store_rows(dv, p.lk, p.dh, pad.dh, io.grad_v + bh * p.lk * p.dh);
        }
      }
    }
  });

  if (p.kv_broadcast) {
    // Sum the partials, head by head.
    at::parallel_for(0, p.heads, 1, [&](int64_t h0, int64_t h1) {
      std::vector<T> sum(head_size);
      for (int64_t h = h0; h < h1; ++h) {
        for (int which = 0; which < 2; ++which) {
          const std::vector<T>& partial = which == 0 ? partial_dk : partial_dv;
          scalar_t* grad = which == 0 ? io.grad_k : io.grad_v;
          if (grad == nullptr) continue;
          std::fill(sum.begin(), sum.end(), T(0));
          for (int64_t part = 0; part < parts; ++part) {
            const T* src = partial.data() + (part * p.heads + h) * head_size;
#pragma omp simd
            for (int64_t x = 0; x < head_size; ++x) sum[x] += src[x];
          }
          store_rows(sum.data(), p.lk, p.dh, pad.dh, grad + h * p.lk * p.dh);
        }
      }
    });
  }
}

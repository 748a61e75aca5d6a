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
// (b, h) runs start to finish on one core with every operand in L1/L2, through one micro-kernel
// C (+)= A B with A read as broadcast scalars (any layout, so a transposed A is free) and B, C as
// vectors (the GEMM "outer product" form that vectorises without horizontal sums).
//
// Queries ride the vector lanes: per query tile, Q^T (and dO^T in the backward) is laid out once by
// register transposes, and the scores are kept transposed, S^T (keys x queries). Then
//   - the softmax over a query's keys runs down a column: vertical max, exp and sum, no horizontal
//     reduction anywhere;
//   - K, V, Q, dO rows serve every other GEMM as they are (A operands, or B operands with Dh along
//     the lanes), so no K^T / V^T layout per (b, h);
//   - the keys a batch element attends are gathered first and padding keys are simply absent (never
//     computed: ~30% of the work at typical padding; no -inf bias; a query either has all of its
//     gathered keys or none at all).

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
// Accumulator registers of a micro-tile: 16 of AVX-512's 32 vector registers, 8 of AVX2's / SSE's
// 16 (the rest hold B vectors and the broadcast). A tile of NV vectors across has
// kAccumulators / NV rows (at most 8: more rows only add broadcast loads).
constexpr int kAccumulators = kVectorBytes >= 64 ? 16 : 8;
constexpr int kVecs = kVectorBytes >= 64 ? 4 : 2;
template <int NV>
constexpr int kTileRows = kAccumulators / NV < 8 ? kAccumulators / NV : 8;
// Queries per tile (the lanes of S^T: 64 = 4 AVX-512 float vectors) and keys per block of the
// online softmax (a 128 x 64 score block, 32 KiB, stays in L1/L2; at Lk <= 128 one block, exact).
constexpr int64_t kQueryTile = 64;
constexpr int64_t kKeyBlock = 128;

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

// Rows of C in tiles of R, the remainder in tiles of R/2, R/4, ..., 1.
template <typename T, int R, int NV, bool kAccumulate>
inline void gemm_rows(int64_t m, int64_t k, const T* a, int64_t lda, int64_t aps, const T* b, int64_t ldb, T* c,
                      int64_t ldc) {
  int64_t i = 0;
  for (; i + R <= m; i += R) micro_tile<T, R, NV, kAccumulate>(k, a + i * lda, lda, aps, b, ldb, c + i * ldc, ldc);
  if constexpr (R > 1) {
    if (i < m) gemm_rows<T, R / 2, NV, kAccumulate>(m - i, k, a + i * lda, lda, aps, b, ldb, c + i * ldc, ldc);
  }
}

// C[m x n] (+)= A[m x k] B[k x n], n a multiple of the vector length (callers pad with zeros);
// A(r, p) = a[r * lda + p * aps].
template <typename T, bool kAccumulate>
void gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, int64_t aps, const T* b, int64_t ldb, T* c,
          int64_t ldc) {
  constexpr int64_t L = kLanes<T>;
  int64_t j = 0;
  for (; j + kVecs * L <= n; j += kVecs * L) {
    gemm_rows<T, kTileRows<kVecs>, kVecs, kAccumulate>(m, k, a, lda, aps, b + j, ldb, c + j, ldc);
  }
  if constexpr (kVecs > 2) {
    if (j + 2 * L <= n) {
      gemm_rows<T, kTileRows<2>, 2, kAccumulate>(m, k, a, lda, aps, b + j, ldb, c + j, ldc);
      j += 2 * L;
    }
  }
  if (j < n) gemm_rows<T, kTileRows<1>, 1, kAccumulate>(m, k, a, lda, aps, b + j, ldb, c + j, ldc);
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

// exp(x) for x <= 0, exactly 0 at x = -inf (a weight that must vanish must not be 1e-38).
inline float exp_nonpositive(float x) { return x < -87.0f ? 0.0f : fast_exp(x); }
inline double exp_nonpositive(double x) { return std::exp(x); }

// The next (b, h)'s inputs, pulled towards L2 a few lines at a time while the current one computes
// (advance() from its row loops): a burst of hundreds of prefetches at once mostly stalls on the
// core's miss buffers instead of overlapping with arithmetic.
class Prefetcher {
 public:
  void add(const void* base, int64_t rows, int64_t row_stride_bytes, int64_t row_bytes) {
    if (count_ == kMaxRanges || rows <= 0) return;
    ranges_[count_++] = Range{static_cast<const char*>(base), rows, row_stride_bytes, (row_bytes + 63) / 64};
    total_ += rows * ((row_bytes + 63) / 64);
  }
  // The prefetches are spread over `steps` calls of step().
  void pace(int64_t steps) { per_step_ = steps > 0 ? (total_ + steps - 1) / steps : total_; }
  void step() { issue(per_step_); }

 private:
  void issue(int64_t lines) {
    for (; lines > 0 && range_ < count_; --lines) {
      const Range& r = ranges_[range_];
      __builtin_prefetch(r.base + row_ * r.stride + line_ * 64, 0, 2);
      if (++line_ == r.lines) {
        line_ = 0;
        if (++row_ == r.rows) {
          row_ = 0;
          ++range_;
        }
      }
    }
  }
  struct Range {
    const char* base;
    int64_t rows, stride, lines;
  };
  static constexpr int kMaxRanges = 5;
  Range ranges_[kMaxRanges];
  int count_ = 0, range_ = 0;
  int64_t total_ = 0, per_step_ = 0, row_ = 0, line_ = 0;
};

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

// Rows of a tensor serve as GEMM operands in place when they are acc_t and Dh is a whole number of
// vectors (a B operand needs no padding columns).
template <typename scalar_t, typename T>
inline bool rows_in_place(int64_t dh) {
  return std::is_same_v<scalar_t, T> && dh % kLanes<T> == 0;
}

template <typename scalar_t>
const scalar_t* head_ptr(const scalar_t* base, const Strides4& s, int64_t b, int64_t h) {
  return base + b * s.batch + h * s.head;
}

// Output rows are written once and never read back by the op: storing whole vectors non-temporally
// skips the read of every destination line that an ordinary store's write-allocate makes (with the
// output cache, the blocks are reused memory that is no longer in any cache). GCC on x86 only; other
// compilers and edge rows store normally. streaming_fence() orders them before the thread finishes.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define OCLEAR_STREAMING_STORES 1
template <typename T>
inline void stream_vector(T* dst, typename Simd<T>::V v) {
  if constexpr (std::is_same_v<T, float>) {
    if constexpr (kVectorBytes == 64) {
      __builtin_ia32_movntps512(dst, v);
    } else if constexpr (kVectorBytes == 32) {
      __builtin_ia32_movntps256(dst, v);
    } else {
      __builtin_ia32_movntps(dst, v);
    }
  } else {
    if constexpr (kVectorBytes == 64) {
      __builtin_ia32_movntpd512(dst, v);
    } else if constexpr (kVectorBytes == 32) {
      __builtin_ia32_movntpd256(dst, v);
    } else {
      __builtin_ia32_movntpd(dst, v);
    }
  }
}
inline void streaming_fence() { __builtin_ia32_sfence(); }
#else
inline void streaming_fence() {}
#endif

// dst[d] = factor * src[d] for d < n, converted to scalar_t (src null: zeros); non-temporal where
// `stream` and the row is whole aligned vectors of acc_t.
template <typename scalar_t, typename T>
inline void store_row(const T* src, int64_t n, T factor, scalar_t* dst, bool stream) {
#ifdef OCLEAR_STREAMING_STORES
  if constexpr (std::is_same_v<scalar_t, T>) {
    using V = typename Simd<T>::V;
    using U = typename Simd<T>::U;
    constexpr int64_t L = kLanes<T>;
    if (stream && n % L == 0 && reinterpret_cast<uintptr_t>(dst) % kVectorBytes == 0) {
      for (int64_t d = 0; d < n; d += L) {
        stream_vector(dst + d, src != nullptr ? factor * *reinterpret_cast<const U*>(src + d) : V{});
      }
      return;
    }
  }
#endif
  if (src == nullptr) {
    std::fill(dst, dst + n, scalar_t(0));
    return;
  }
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<scalar_t>(factor * src[d]);
}

// dst (cols x rows_p, row-major) = src^T, src (rows x cols, row stride ld_src) converted to T; lanes
// rows..rows_p of dst are zero. Whole L x L tiles of acc_t input go through register transposes.
template <typename scalar_t, typename T>
void transpose_rows(const scalar_t* src, int64_t ld_src, int64_t rows, int64_t rows_p, int64_t cols, T* dst) {
  constexpr int64_t L = kLanes<T>;
  for (int64_t i0 = 0; i0 < rows_p; i0 += L) {
    for (int64_t d0 = 0; d0 < cols; d0 += L) {
#ifdef OCLEAR_VECTOR_TRANSPOSE
      if constexpr (std::is_same_v<scalar_t, T>) {
        if (i0 + L <= rows && d0 + L <= cols) {
          transpose_tile(src + i0 * ld_src + d0, ld_src, dst + d0 * rows_p + i0, rows_p);
          continue;
        }
      }
#endif
      // Edge tiles element by element, the padding lanes as one fill (Lq = 1 is a 1-row tile).
      const int64_t dn = std::min(L, cols - d0), rn = std::min(L, rows - i0);
      for (int64_t d = 0; d < dn; ++d) {
        T* out = dst + (d0 + d) * rows_p + i0;
        for (int64_t i = 0; i < rn; ++i) out[i] = static_cast<T>(src[(i0 + i) * ld_src + d0 + d]);
        std::fill(out + rn, out + L, T(0));
      }
    }
  }
}

// dst row r (dh_p wide, zero past dh) = src row index[r] (row r when index is null), converted to T.
template <typename src_t, typename T>
void gather_rows(const src_t* src, int64_t ld_src, const int64_t* index, int64_t count, int64_t dh, int64_t dh_p,
                 T* dst) {
  for (int64_t r = 0; r < count; ++r) {
    const src_t* row = src + (index != nullptr ? index[r] : r) * ld_src;
    T* out = dst + r * dh_p;
#pragma omp simd
    for (int64_t d = 0; d < dh; ++d) out[d] = static_cast<T>(row[d]);
    std::fill(out + dh, out + dh_p, T(0));
  }
}

// dst (lk x dh) row index[r] = src row r (count rows, dh_p wide), converted; every other row zero
// (a padding key gets no gradient). index is increasing.
template <typename scalar_t, typename T>
void scatter_rows(const T* src, const int64_t* index, int64_t count, int64_t lk, int64_t dh, int64_t dh_p,
                  scalar_t* dst, bool stream) {
  int64_t r = 0;
  for (int64_t j = 0; j < lk; ++j) {
    scalar_t* row = dst + j * dh;
    const bool attended = r < count && index[r] == j;
    store_row(attended ? src + r * dh_p : nullptr, dh, T(1), row, stream);
    r += attended;
  }
}

// K and V rows of the keys one (b, h) attends, in acc_t, `count` of them; V's rows (a B operand)
// are a whole number of vectors wide, zero past Dh.
template <typename T>
struct KeyRows {
  const T* k;
  const T* v;
  int64_t ldk, ldv, count;
};

// A memory shared by the batch whose rows cannot serve in place: converted once per head (K then
// V, Lk x Dh_p each), not once per (b, h). Empty otherwise.
template <typename T, typename scalar_t>
std::vector<T> shared_rows(const AttentionProblem<scalar_t>& p, int64_t dh_p) {
  std::vector<T> rows;
  if (!p.kv_broadcast || rows_in_place<scalar_t, T>(p.dh)) return rows;
  const int64_t size = p.lk * dh_p;
  rows.resize(2 * p.heads * size);
  at::parallel_for(0, p.heads, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      gather_rows(head_ptr(p.k, p.k_strides, 0, h), p.k_strides.row, nullptr, p.lk, p.dh, dh_p,
                  rows.data() + 2 * h * size);
      gather_rows(head_ptr(p.v, p.v_strides, 0, h), p.v_strides.row, nullptr, p.lk, p.dh, dh_p,
                  rows.data() + (2 * h + 1) * size);
    }
  });
  return rows;
}

// One thread's view of the keys: which keys the current batch element attends (listed once per b,
// reused by its heads) and room to gather their K, V rows.
template <typename T>
class KeyGather {
 public:
  KeyGather(int64_t lk, int64_t dh_p) : index_(lk), k_(lk * dh_p), v_(lk * dh_p), dh_p_(dh_p) {}

  // The attended K, V rows of (b, h): the tensors' own rows when every key takes part and they fit,
  // the shared converted copy likewise, else gathered (and converted) into this thread's buffers.
  template <typename scalar_t>
  KeyRows<T> rows(const AttentionProblem<scalar_t>& p, const std::vector<T>& shared, int64_t b, int64_t h) {
    if (b != listed_b_) {
      count_ = 0;
      for (int64_t j = 0; j < p.lk; ++j) {
        if (p.mask == nullptr || !p.mask[b * p.lk + j]) index_[count_++] = j;
      }
      listed_b_ = b;
    }
    const bool all = count_ == p.lk;
    if (all && rows_in_place<scalar_t, T>(p.dh)) {
      return {reinterpret_cast<const T*>(head_ptr(p.k, p.k_strides, b, h)),
              reinterpret_cast<const T*>(head_ptr(p.v, p.v_strides, b, h)), p.k_strides.row, p.v_strides.row, count_};
    }
    if (!shared.empty()) {
      const T* k = shared.data() + 2 * h * p.lk * dh_p_;
      const T* v = k + p.lk * dh_p_;
      if (all) return {k, v, dh_p_, dh_p_, count_};
      gather_rows(k, dh_p_, index_.data(), count_, dh_p_, dh_p_, k_.data());
      gather_rows(v, dh_p_, index_.data(), count_, dh_p_, dh_p_, v_.data());
    } else {
      const int64_t* index = all ? nullptr : index_.data();
      gather_rows(head_ptr(p.k, p.k_strides, b, h), p.k_strides.row, index, count_, p.dh, dh_p_, k_.data());
      gather_rows(head_ptr(p.v, p.v_strides, b, h), p.v_strides.row, index, count_, p.dh, dh_p_, v_.data());
    }
    return {k_.data(), v_.data(), dh_p_, dh_p_, count_};
  }

  // The attended keys of the last batch element rows() was called for, increasing.
  const int64_t* index() const { return index_.data(); }

 private:
  std::vector<int64_t> index_;
  std::vector<T> k_, v_;
  int64_t dh_p_, listed_b_ = -1, count_ = 0;
};

template <typename scalar_t>
void add_inputs(Prefetcher& pf, const AttentionProblem<scalar_t>& p, int64_t b, int64_t h) {
  const int64_t e = sizeof(scalar_t);
  pf.add(head_ptr(p.q, p.q_strides, b, h), p.lq, p.q_strides.row * e, p.dh * e);
  if (!p.kv_broadcast) {
    pf.add(head_ptr(p.k, p.k_strides, b, h), p.lk, p.k_strides.row * e, p.dh * e);
    pf.add(head_ptr(p.v, p.v_strides, b, h), p.lk, p.v_strides.row * e, p.dh * e);
  }
}

inline int64_t query_tiles(int64_t lq) { return (lq + kQueryTile - 1) / kQueryTile; }

// ---------------------------------------------------------------------------------------------
// Forward of one (b, h): out (Lq x Dh, contiguous) and lse (Lq). Per query tile of n lanes:
// S^T = K Q^T one key block at a time, online softmax down the columns, O (+)= P V.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct ForwardScratch {
  int64_t dh_p;
  std::vector<T> qt, s, o, m, l, alpha;
  KeyGather<T> keys;
  ForwardScratch(int64_t lk, int64_t dh, int64_t dh_p_)
      : dh_p(dh_p_), qt(dh * kQueryTile), s(std::min(kKeyBlock, lk) * kQueryTile), o(kQueryTile * dh_p_),
        m(kQueryTile), l(kQueryTile), alpha(kQueryTile), keys(lk, dh_p_) {}
};

// One key block of the online softmax over S^T (jb x n, a query per lane): s <- exp(scale s - m'),
// with m' the running column max, l the running column sum, alpha = exp(m - m') the factor for
// what was accumulated before (0 before the first block, where m = -inf).
template <typename T>
void softmax_block(T* s, int64_t jb, int64_t n, T scale, T* m, T* l, T* alpha, Prefetcher& next) {
  T mx[kQueryTile];
  T sum[kQueryTile];
  for (int64_t i = 0; i < n; ++i) {
    mx[i] = m[i];
    sum[i] = T(0);
  }
  for (int64_t j = 0; j < jb; ++j) {
    T* row = s + j * n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T x = scale * row[i];
      row[i] = x;
      mx[i] = x > mx[i] ? x : mx[i];
    }
  }
  for (int64_t j = 0; j < jb; ++j) {
    T* row = s + j * n;
    next.step();
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T e = exp_nonpositive(row[i] - mx[i]);
      row[i] = e;
      sum[i] += e;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    alpha[i] = exp_nonpositive(m[i] - mx[i]);
    l[i] = l[i] * alpha[i] + sum[i];
    m[i] = mx[i];
  }
}

template <typename scalar_t, typename T>
void forward_head(const AttentionProblem<scalar_t>& p, const KeyRows<T>& kv, const scalar_t* q, scalar_t* out, T* lse,
                  bool stream, ForwardScratch<T>& w, Prefetcher& next) {
  const int64_t dh = p.dh, dhp = w.dh_p;
  if (kv.count == 0) {  // every key is padding: out = 0, lse = -inf
    std::fill(out, out + p.lq * dh, scalar_t(0));
    std::fill(lse, lse + p.lq, T(-INFINITY));
    return;
  }
  next.pace(query_tiles(p.lq) * kv.count);
  const T scale = static_cast<T>(p.scale);
  T* s = w.s.data();
  T* o = w.o.data();
  for (int64_t i0 = 0; i0 < p.lq; i0 += kQueryTile) {
    const int64_t tq = std::min(kQueryTile, p.lq - i0);
    const int64_t n = round_up(tq, kLanes<T>);
    transpose_rows(q + i0 * p.q_strides.row, p.q_strides.row, tq, n, dh, w.qt.data());
    std::fill(w.m.begin(), w.m.begin() + n, T(-INFINITY));
    std::fill(w.l.begin(), w.l.begin() + n, T(0));
    for (int64_t j0 = 0; j0 < kv.count; j0 += kKeyBlock) {
      const int64_t jb = std::min(kKeyBlock, kv.count - j0);
      gemm<T, false>(jb, n, dh, kv.k + j0 * kv.ldk, kv.ldk, 1, w.qt.data(), n, s, n);  // S^T = K Q^T
      softmax_block(s, jb, n, scale, w.m.data(), w.l.data(), w.alpha.data(), next);
      if (j0 > 0) {
        for (int64_t i = 0; i < tq; ++i) {
          const T a = w.alpha[i];
          T* orow = o + i * dhp;
#pragma omp simd
          for (int64_t d = 0; d < dhp; ++d) orow[d] *= a;
        }
      }
      gemm_into<T>(j0 > 0, tq, dhp, jb, s, 1, n, kv.v + j0 * kv.ldv, kv.ldv, o, dhp);  // O (+)= P V
    }
    for (int64_t i = 0; i < tq; ++i) {  // every query saw at least one key: l >= 1
      const T inv = T(1) / w.l[i];
      const T* orow = o + i * dhp;
      store_row(orow, dh, inv, out + (i0 + i) * dh, stream);
      lse[i0 + i] = w.m[i] + std::log(w.l[i]);
    }
  }
}

template <typename scalar_t>
void forward(const AttentionProblem<scalar_t>& p, scalar_t* out, at::opmath_type<scalar_t>* lse, bool stream) {
  using T = at::opmath_type<scalar_t>;
  const int64_t dh_p = round_up(p.dh, kLanes<T>);
  const std::vector<T> shared = shared_rows<T>(p, dh_p);
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t bh0, int64_t bh1) {
    ForwardScratch<T> w(p.lk, p.dh, dh_p);
    for (int64_t bh = bh0; bh < bh1; ++bh) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      Prefetcher next;
      if (bh + 1 < bh1) add_inputs(next, p, (bh + 1) / p.heads, (bh + 1) % p.heads);
      const KeyRows<T> kv = w.keys.rows(p, shared, b, h);
      forward_head(p, kv, head_ptr(p.q, p.q_strides, b, h), out + bh * p.lq * p.dh, lse + bh * p.lq, stream, w, next);
    }
    streaming_fence();
  });
}

// ---------------------------------------------------------------------------------------------
// Backward of one (b, h), FlashAttention-2 style with the scores transposed: per query tile,
// recompute P^T = exp(scale K Q^T - lse) block by block, then
//   dV += P^T dO,  dP^T = V dO^T,  dS^T = P^T * (dP^T - rowsum(dO * O)),  dQ += dS K,  dK += dS^T Q
// with the scale folded into dS (so dQ and dK need no extra pass). dK, dV of the attended keys
// accumulate over the query tiles in acc_t scratch (count x Dh_p); the caller puts them in place.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct BackwardScratch {
  int64_t dh_p;
  std::vector<T> qt, dot, q, dout, delta, lse, p, dp, dq, dk, dv;
  KeyGather<T> keys;
  BackwardScratch(int64_t lk, int64_t dh, int64_t dh_p_, bool rows_fit)
      : dh_p(dh_p_), qt(dh * kQueryTile), dot(dh * kQueryTile), q(rows_fit ? 0 : kQueryTile * dh_p_),
        dout(rows_fit ? 0 : kQueryTile * dh_p_), delta(kQueryTile), lse(kQueryTile),
        p(std::min(kKeyBlock, lk) * kQueryTile), dp(std::min(kKeyBlock, lk) * kQueryTile), dq(kQueryTile * dh_p_),
        dk(lk * dh_p_), dv(lk * dh_p_), keys(lk, dh_p_) {}
};

template <typename scalar_t, typename T>
void backward_head(const AttentionProblem<scalar_t>& p, const BackwardIO<scalar_t>& io, const KeyRows<T>& kv,
                   int64_t b, int64_t h, BackwardScratch<T>& w, Prefetcher& next) {
  const int64_t dh = p.dh, dhp = w.dh_p, bh = b * p.heads + h;
  scalar_t* grad_q = io.grad_q != nullptr ? io.grad_q + bh * p.lq * dh : nullptr;
  if (kv.count == 0) {  // no key: no probability, no gradient (the caller zeroes dK, dV rows)
    if (grad_q != nullptr) std::fill(grad_q, grad_q + p.lq * dh, scalar_t(0));
    return;
  }
  const bool need_dk = io.grad_k != nullptr, need_dv = io.grad_v != nullptr;
  const bool need_ds = grad_q != nullptr || need_dk;
  const scalar_t* q = head_ptr(p.q, p.q_strides, b, h);
  const scalar_t* dout = io.grad_out + bh * p.lq * dh;
  const scalar_t* out = io.out + bh * p.lq * dh;
  const T* lse = io.lse + bh * p.lq;
  const bool in_place = rows_in_place<scalar_t, T>(dh);
  const T scale = static_cast<T>(p.scale);
  T* pm = w.p.data();
  T* dp = w.dp.data();
  next.pace(query_tiles(p.lq) * kv.count);
  for (int64_t i0 = 0; i0 < p.lq; i0 += kQueryTile) {
    const int64_t tq = std::min(kQueryTile, p.lq - i0);
    const int64_t n = round_up(tq, kLanes<T>);
    const bool first_tile = i0 == 0;
    const scalar_t* qtile = q + i0 * p.q_strides.row;
    const scalar_t* dotile = dout + i0 * dh;
    // Q^T, dO^T: B operands of S^T = K Q^T and dP^T = V dO^T. Q, dO rows: of dK = dS^T Q, dV = P^T dO.
    transpose_rows(qtile, p.q_strides.row, tq, n, dh, w.qt.data());
    if (need_ds) transpose_rows(dotile, dh, tq, n, dh, w.dot.data());
    const T* qr = reinterpret_cast<const T*>(qtile);
    const T* dor = reinterpret_cast<const T*>(dotile);
    int64_t ldq = p.q_strides.row, lddo = dh;
    if (!in_place) {
      gather_rows(qtile, p.q_strides.row, nullptr, tq, dh, dhp, w.q.data());
      gather_rows(dotile, dh, nullptr, tq, dh, dhp, w.dout.data());
      qr = w.q.data();
      dor = w.dout.data();
      ldq = lddo = dhp;
    }
    // Per query lane: delta = rowsum(dO * O) and the lse; padding lanes get lse = +inf, so P = 0 there.
    for (int64_t i = 0; i < n; ++i) {
      T acc = 0;
      if (i < tq) {
        const scalar_t* orow = out + (i0 + i) * dh;
        const scalar_t* grow = dotile + i * dh;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < dh; ++d) acc += static_cast<T>(grow[d]) * static_cast<T>(orow[d]);
      }
      w.delta[i] = acc;
      w.lse[i] = i < tq ? lse[i0 + i] : T(INFINITY);
    }
    for (int64_t j0 = 0; j0 < kv.count; j0 += kKeyBlock) {
      const int64_t jb = std::min(kKeyBlock, kv.count - j0);
      gemm<T, false>(jb, n, dh, kv.k + j0 * kv.ldk, kv.ldk, 1, w.qt.data(), n, pm, n);  // S^T
      const T* lse_lane = w.lse.data();
      for (int64_t j = 0; j < jb; ++j) {
        T* row = pm + j * n;
        next.step();
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) row[i] = exp_nonpositive(std::min(scale * row[i] - lse_lane[i], T(0)));
      }
      if (need_dv) {  // dV (+)= P^T dO
        gemm_into<T>(!first_tile, jb, dhp, tq, pm, n, 1, dor, lddo, w.dv.data() + j0 * dhp, dhp);
      }
      if (!need_ds) continue;
      gemm<T, false>(jb, n, dh, kv.v + j0 * kv.ldv, kv.ldv, 1, w.dot.data(), n, dp, n);  // dP^T = V dO^T
      const T* delta = w.delta.data();
      for (int64_t j = 0; j < jb; ++j) {  // dS^T, times the scale
        T* dsrow = dp + j * n;
        const T* prow = pm + j * n;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dsrow[i] = scale * prow[i] * (dsrow[i] - delta[i]);
      }
      if (grad_q != nullptr) {  // dQ (+)= dS K
        gemm_into<T>(j0 > 0, tq, dhp, jb, dp, 1, n, kv.k + j0 * kv.ldk, kv.ldk, w.dq.data(), dhp);
      }
      if (need_dk) {  // dK (+)= dS^T Q
        gemm_into<T>(!first_tile, jb, dhp, tq, dp, n, 1, qr, ldq, w.dk.data() + j0 * dhp, dhp);
      }
    }
    if (grad_q != nullptr) {
      for (int64_t i = 0; i < tq; ++i) {
        store_row(w.dq.data() + i * dhp, dh, T(1), grad_q + (i0 + i) * dh, io.stream_grad_q);
      }
    }
  }
}

// Writes rows (Lk x Dh) of an acc_t layout (Lk x Dh_p) into a scalar_t tensor.
template <typename scalar_t, typename T>
void store_rows(const T* src, int64_t lk, int64_t dh, int64_t dh_padded, scalar_t* dst, bool stream) {
  for (int64_t j = 0; j < lk; ++j) store_row(src + j * dh_padded, dh, T(1), dst + j * dh, stream);
}

template <typename scalar_t>
void backward(const AttentionProblem<scalar_t>& p, const BackwardIO<scalar_t>& io) {
  using T = at::opmath_type<scalar_t>;
  const int64_t dh_p = round_up(p.dh, kLanes<T>);
  const int64_t head_size = p.lk * dh_p;
  const bool need_k = io.grad_k != nullptr, need_v = io.grad_v != nullptr;
  if (io.grad_q == nullptr && !need_k && !need_v) return;
  const std::vector<T> shared = shared_rows<T>(p, dh_p);

  // A shared memory's dK, dV are sums over the batch: the (b, h) range is cut into `parts`
  // contiguous pieces (one per thread), each with its own acc_t partial, added up at the end in a
  // fixed order. Never a (B, H, Lk, Dh) intermediate. Per-batch keys write their gradients directly.
  const int64_t total = p.batch * p.heads;
  const int64_t parts = p.kv_broadcast ? std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total)) : total;
  std::vector<T> partial_dk(p.kv_broadcast && need_k ? parts * p.heads * head_size : 0);
  std::vector<T> partial_dv(p.kv_broadcast && need_v ? parts * p.heads * head_size : 0);

  at::parallel_for(0, parts, 1, [&](int64_t part0, int64_t part1) {
    BackwardScratch<T> w(p.lk, p.dh, dh_p, rows_in_place<scalar_t, T>(p.dh));
    for (int64_t part = part0; part < part1; ++part) {
      const int64_t bh0 = p.kv_broadcast ? part * total / parts : part;
      const int64_t bh1 = p.kv_broadcast ? (part + 1) * total / parts : part + 1;
      for (int64_t bh = bh0; bh < bh1; ++bh) {
        const int64_t b = bh / p.heads, h = bh % p.heads;
        Prefetcher next;
        // The next (b, h) of this thread: within the part for a shared memory, the next part otherwise.
        if (bh + 1 < (p.kv_broadcast ? bh1 : part1)) {
          const int64_t nb = (bh + 1) / p.heads, nh = (bh + 1) % p.heads;
          add_inputs(next, p, nb, nh);
          const int64_t row_bytes = p.dh * static_cast<int64_t>(sizeof(scalar_t));
          next.add(io.grad_out + (bh + 1) * p.lq * p.dh, p.lq, row_bytes, row_bytes);
          next.add(io.out + (bh + 1) * p.lq * p.dh, p.lq, row_bytes, row_bytes);
        }
        const KeyRows<T> kv = w.keys.rows(p, shared, b, h);
        backward_head(p, io, kv, b, h, w, next);
        for (int which = 0; which < 2; ++which) {  // dK, dV of the attended keys into their rows
          scalar_t* grad = which == 0 ? io.grad_k : io.grad_v;
          if (grad == nullptr) continue;
          const bool stream = which == 0 ? io.stream_grad_k : io.stream_grad_v;
          const T* src = (which == 0 ? w.dk : w.dv).data();
          if (p.kv_broadcast) {
            T* sum = (which == 0 ? partial_dk : partial_dv).data() + (part * p.heads + h) * head_size;
            for (int64_t r = 0; r < kv.count; ++r) {
              T* dst = sum + w.keys.index()[r] * dh_p;
              const T* row = src + r * dh_p;
#pragma omp simd
              for (int64_t d = 0; d < dh_p; ++d) dst[d] += row[d];
            }
          } else {
            scatter_rows(src, w.keys.index(), kv.count, p.lk, p.dh, dh_p, grad + bh * p.lk * p.dh, stream);
          }
        }
      }
    }
    streaming_fence();
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
          const bool stream = which == 0 ? io.stream_grad_k : io.stream_grad_v;
          std::fill(sum.begin(), sum.end(), T(0));
          for (int64_t part = 0; part < parts; ++part) {
            const T* src = partial.data() + (part * p.heads + h) * head_size;
#pragma omp simd
            for (int64_t x = 0; x < head_size; ++x) sum[x] += src[x];
          }
          store_rows(sum.data(), p.lk, p.dh, dh_p, grad + h * p.lk * p.dh, stream);
        }
      }
      streaming_fence();
    });
  }
}

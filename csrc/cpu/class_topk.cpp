// CPU hardest-class scoring: per class, the largest cosine to any row of the batch, then a streaming
// top-k over the classes. Walks the classes in chunks like the margin softmax: one GEMM
// x^ @ W_chunk^T per chunk, a column max over the rows, scaled by the class's inverse norm (positive,
// so it commutes with the max), then the chunk's candidates go into a k-sized buffer. Memory:
// O(N x chunk + k), never the N x C scores or even the C per-class scores.
#include "class_topk.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <limits>
#include <vector>

#include <oclear/topk.h>

#include "class_chunks.h"

namespace oclear::cpu {
namespace {

// col_max[j] = max_i s[i, j] over the n rows of a row-major (n, t) block.
template <typename acc_t>
void column_max(const acc_t* s, int64_t n, int64_t t, acc_t* col_max) {
  constexpr int64_t kColumnGrain = 256;
  at::parallel_for(0, t, kColumnGrain, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) col_max[j] = -std::numeric_limits<acc_t>::infinity();
    for (int64_t i = 0; i < n; ++i) {
      const acc_t* row = s + i * t;
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) col_max[j] = std::max(col_max[j], row[j]);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> class_topk(const at::Tensor& embeddings, const at::Tensor& weight_in,
                                              const at::Tensor& exclude_in, int64_t k, int64_t class_chunk) {
  const int64_t n = embeddings.size(0);
  const int64_t d = embeddings.size(1);
  const int64_t c_local = weight_in.size(0);
  const at::ScalarType acc = at::toOpMathType(embeddings.scalar_type());
  const auto acc_opts = embeddings.options().dtype(acc);
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor exclude = exclude_in.contiguous();
  const Normalized xn = normalize_rows(embeddings, acc);
  const int64_t chunk = chunk_classes(n, class_chunk);
  at::Tensor values = at::empty({k}, acc_opts);
  at::Tensor ids = at::empty({k}, embeddings.options().dtype(at::kLong));

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, embeddings.scalar_type(), "oclear::class_topk", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        TopKBuffer<acc_t> best(k);
        const int64_t* excluded = exclude.data_ptr<int64_t>();
        const int64_t num_excluded = exclude.numel();
        int64_t next_excluded = 0;  // exclude is sorted: walk it along with the chunks
        at::Tensor scores_buffer = at::empty({n * std::min(chunk, c_local)}, acc_opts);
        at::Tensor w_buffer = std::is_same_v<scalar_t, acc_t> ? at::Tensor() : at::empty({chunk, d}, acc_opts);
        std::vector<acc_t> w_inv(chunk), col_max(chunk);
        std::vector<ScoredClass<acc_t>> candidates;
        candidates.reserve(chunk);

        for (int64_t c0 = 0; c0 < c_local && k > 0; c0 += chunk) {
          const int64_t t = std::min(chunk, c_local - c0);
          const at::Tensor wt = weight_chunk<scalar_t, acc_t>(weight, c0, t, w_buffer);
          inverse_norms(wt.data_ptr<acc_t>(), t, d, w_inv.data());
          at::Tensor s = scores_buffer.narrow(0, 0, n * t).view({n, t});
          at::mm_out(s, xn.x_hat, wt.t());
          column_max(s.data_ptr<acc_t>(), n, t, col_max.data());
          candidates.clear();
          for (int64_t j = 0; j < t; ++j) {
            const int64_t id = c0 + j;
            if (next_excluded < num_excluded && excluded[next_excluded] == id) {
              ++next_excluded;
              continue;
            }
            candidates.push_back({col_max[j] * w_inv[j], id});
          }
          best.push_batch(candidates.data(), static_cast<int64_t>(candidates.size()));
        }

        const std::vector<ScoredClass<acc_t>> top = best.finish();
        acc_t* value_ptr = values.data_ptr<acc_t>();
        int64_t* id_ptr = ids.data_ptr<int64_t>();
        for (size_t r = 0; r < top.size(); ++r) {
          value_ptr[r] = top[r].score;
          id_ptr[r] = top[r].id;
        }
      });
  return {values, ids};
}

}  // namespace oclear::cpu

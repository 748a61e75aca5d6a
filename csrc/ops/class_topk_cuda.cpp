// CUDA registration of the hardest-class scoring op (schema in class_topk.cpp), compiled only when
// setup.py builds the CUDA kernels (OCLEAR_WITH_CUDA).
//
// Same algorithm and order as the CPU op: classes in chunks; per chunk the GEMM S = x^ W_chunk^T
// (ATen / cuBLAS, 16-bit operands on tensor cores with float32 output), the column max over the
// batch rows (NaN rows ignored, as the CPU's std::max loop does), times the chunk's inverse norms
// (our normalisation kernel, no normalised copy of W); then the chunk's candidates merge with the
// running best k by three stable sorts (class id ascending, score descending, then rank: scored <
// NaN < excluded), which is exactly the CPU's order: higher score first, equal scores by smaller id,
// NaN below everything. Excluded classes are ranked last rather than removed, so nothing here waits
// for the device. Memory O(N x T + k + T), never the C per-class scores.
// The `exclude` checks (ids in range, sorted, unique) cost one device-to-host read.
#ifdef OCLEAR_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <algorithm>
#include <limits>
#include <string>
#include <tuple>

#include "../cuda_sm90/margin_softmax_sm90.cuh"
#include "class_topk_checks.h"
#include "cuda_glue.h"
#include "margin_softmax_fused.h"

namespace oclear {
namespace {

using namespace cuda_glue;

constexpr const char* kOp = "oclear_ext.hardest_classes: ";

// exclude (sorted unique class ids) on the device: one boolean read back; the messages are the CPU's.
void check_exclude_on_device(const at::Tensor& exclude, int64_t c) {
  const int64_t e = exclude.numel();
  if (e == 0) return;
  at::Tensor bad = (exclude < 0).logical_or_(exclude >= c).any();
  if (e > 1) bad.logical_or_((exclude.slice(0, 1) <= exclude.slice(0, 0, e - 1)).any());
  if (!bad.item<bool>()) return;
  const at::Tensor ex = exclude.cpu();
  const int64_t* p = ex.data_ptr<int64_t>();
  for (int64_t i = 0; i < e; ++i) {
    TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < c, kOp, "exclude[", i, "] = ", p[i], " is not a class id in [0, ", c, ")");
    TORCH_CHECK_VALUE(i == 0 || p[i] > p[i - 1], kOp,
                      "exclude must be sorted and without duplicates (torch.unique), got exclude[", i - 1, "] = ",
                      p[i - 1], " then ", p[i]);
  }
}

// The permutation that sorts candidates by (rank ascending, score descending, id ascending).
at::Tensor candidate_order(const at::Tensor& score_key, const at::Tensor& ids, const at::Tensor& rank) {
  at::Tensor order = std::get<1>(at::sort(ids, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  order = order.index_select(0, std::get<1>(at::sort(score_key.index_select(0, order), true, 0, true)));
  return order.index_select(0, std::get<1>(at::sort(rank.index_select(0, order), true, 0, false)));
}

// rank: 0 scored, 1 NaN, 2 excluded (the order of candidate_order); key: the score with NaN as -inf.
std::tuple<at::Tensor, at::Tensor> ranks_and_keys(const at::Tensor& score, const at::Tensor& ids,
                                                  const at::Tensor& exclude) {
  const at::Tensor is_nan = score.isnan();
  at::Tensor rank = is_nan.to(at::kLong);
  if (exclude.numel() > 0) {
    const at::Tensor pos = at::searchsorted(exclude, ids).clamp_max_(exclude.numel() - 1);
    rank.masked_fill_(exclude.index_select(0, pos).eq(ids), 2);
  }
  return {rank, score.masked_fill(is_nan, -std::numeric_limits<double>::infinity())};
}

// backend "cutlass_sm90": one CUTLASS GEMM over every class whose epilogue keeps the max of x^ . w_c per
// (128-row tile, class), so no N x C score is written; the C scores then take the chunked path's order
// (candidate_order) in one pass. The max commutes with the positive w_inv scale, so the scores are the
// chunked path's up to the GEMMs' rounding.
std::tuple<at::Tensor, at::Tensor> fused_class_topk(const at::Tensor& embeddings, const at::Tensor& weight,
                                                    const at::Tensor& exclude, int64_t k, cudaStream_t stream) {
  const std::string reason = fused_unavailable_reason(embeddings, weight);
  TORCH_CHECK_VALUE(reason.empty(), kOp, "backend='cutlass_sm90' cannot run this call: ", reason);
  const int64_t n = embeddings.size(0), d = embeddings.size(1), c = weight.size(0);
  const auto f32 = embeddings.options().dtype(at::kFloat);
  const Normalized xn = normalize_rows(embeddings, at::kFloat, stream, kOp);
  const at::Tensor w_inv = inverse_norms(weight, at::kFloat, stream, kOp);
  const int64_t row_tiles = (n + sm90::kTileRows - 1) / sm90::kTileRows;
  const int64_t c_pad = (c + sm90::kTileClasses - 1) / sm90::kTileClasses * sm90::kTileClasses;
  at::Tensor partial = new_buffer({row_tiles, c_pad}, f32);
  at::Tensor ws = at::empty({static_cast<int64_t>(std::max<size_t>(sm90::class_max_workspace_size(n, c, d), 1))},
                            embeddings.options().dtype(at::kByte));
  const int status = sm90::launch_class_max(n, c, d, xn.x_hat.data_ptr(), weight.data_ptr(),
                                            partial.data_ptr<float>(), ws.data_ptr(), stream);
  TORCH_CHECK(status == 0, kOp, "class-max GEMM failed (CUTLASS status ", status, ")");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor score = at::amax(partial.narrow(1, 0, c), {0}).mul_(w_inv);
  const at::Tensor ids = at::arange(c, embeddings.options().dtype(at::kLong));
  const auto [rank, key] = ranks_and_keys(score, ids, exclude);
  const at::Tensor keep = candidate_order(key, ids, rank).narrow(0, 0, k);
  return {score.index_select(0, keep), ids.index_select(0, keep)};
}

std::tuple<at::Tensor, at::Tensor> class_topk_cuda(const at::Tensor& embeddings, const at::Tensor& weight,
                                                   const at::Tensor& exclude_in, int64_t k, int64_t class_chunk_arg,
                                                   c10::string_view backend) {
  check_class_topk(embeddings, weight, exclude_in, k, class_chunk_arg);
  const bool fused = check_class_topk_backend(backend, embeddings);
  const c10::cuda::CUDAGuard guard(embeddings.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor exclude = exclude_in.contiguous();
  const int64_t n = embeddings.size(0), d = embeddings.size(1), c = weight.size(0);
  check_exclude_on_device(exclude, c);

  const at::ScalarType acc = at::toOpMathType(embeddings.scalar_type());
  const auto acc_opts = embeddings.options().dtype(acc);
  const auto id_opts = embeddings.options().dtype(at::kLong);
  if (k == 0) return {at::empty({0}, acc_opts), at::empty({0}, id_opts)};
  if (fused) return fused_class_topk(embeddings, weight, exclude, k, stream);

  const Normalized xn = normalize_rows(embeddings, acc, stream, kOp);
  const int64_t chunk = class_chunk(n, d, c, class_chunk_arg);
  at::Tensor scores = new_buffer({n * chunk}, acc_opts);
  const double inf = std::numeric_limits<double>::infinity();
  at::Tensor best_score = at::empty({0}, acc_opts), best_key = at::empty({0}, acc_opts);
  at::Tensor best_id = at::empty({0}, id_opts), best_rank = at::empty({0}, id_opts);

  for (int64_t c0 = 0; c0 < c; c0 += chunk) {
    const int64_t t = std::min(chunk, c - c0);
    const at::Tensor wt = operand_chunk(weight, c0, t, embeddings.scalar_type());  // float32 W: rounded per chunk
    const at::Tensor w_inv = inverse_norms(wt, acc, stream, kOp);
    at::Tensor s = scores.narrow(0, 0, n * t).view({n, t});
    mm_into(s, xn.x_hat, wt.t());
    s.nan_to_num_(-inf, inf, -inf);  // a NaN row never wins a column (the CPU's std::max keeps the max)
    const at::Tensor score = at::amax(s, {0}).mul_(w_inv);
    const at::Tensor ids = at::arange(c0, c0 + t, id_opts);
    const auto [rank, key] = ranks_and_keys(score, ids, exclude);

    const at::Tensor cand_score = at::cat({best_score, score});
    const at::Tensor cand_key = at::cat({best_key, key});
    const at::Tensor cand_id = at::cat({best_id, ids});
    const at::Tensor cand_rank = at::cat({best_rank, rank});
    const at::Tensor keep = candidate_order(cand_key, cand_id, cand_rank).narrow(0, 0, std::min(k, cand_id.numel()));
    best_score = cand_score.index_select(0, keep);
    best_key = cand_key.index_select(0, keep);
    best_id = cand_id.index_select(0, keep);
    best_rank = cand_rank.index_select(0, keep);
  }
  // k <= C - |exclude| (checked), so the best k hold no excluded class.
  return {best_score, best_id};
}

}  // namespace

TORCH_LIBRARY_IMPL(oclear, CUDA, m) { m.impl("class_topk", &class_topk_cuda); }

}  // namespace oclear

#endif  // OCLEAR_WITH_CUDA

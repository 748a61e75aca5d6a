// The fused margin softmax on Hopper (backend "cutlass_sm90"): the glue around the CUTLASS GEMMs
// (csrc/cuda_sm90/margin_softmax_sm90.cuh) and their per-row / per-class kernels
// (csrc/cuda/margin_softmax_fused.cuh). Same op semantics and outputs as the chunked path
// (margin_softmax_cuda.cpp); docs/cuda.md ("The fused kernels for Hopper") has the algorithm:
//
//   forward   w_inv, x^; per row the target's cosine and margin logit (float64); one GEMM over all classes
//             whose epilogue sums exp(s cos - s) per (row, 256-class tile), never writing a score; the
//             partials merged per row in tile order (float64) with the target's term; rows whose sum
//             underflowed recomputed with a true max.
//   backward  per class chunk: the same GEMM recomputed (same tiles: bit-identical logits), its epilogue
//             writing B = dLoss/dcos * w_inv as bf16 and the per-class sums r_c of the weight projection;
//             dx^ += B W_chunk (ATen, float32 accumulation across chunks); dW_chunk = B^T x^ with the
//             projection fma(beta_c, w_c, .) in the GEMM's epilogue (no float32 E in memory).
//   store-E   (backward="store") the forward GEMM also stores E' = bf16(E * w_inv) (N x C); per chunk the
//             backward builds B from it, then dx^ += B W_chunk and E = B^T x^ (cuBLAS, float32 T x D) and the
//             chunked path's projection kernel: no logit GEMM in the backward. Rows whose E' the exp2 flush
//             lost (the forward's true-max rows; fused_margin.h's stored_row_lost) recompute their logits on
//             CUDA cores instead.
//   any C     the store-E forward and the backward GEMMs take the first C - C mod 8 classes (TMA's 16-byte
//             rows of their N x C bf16 matrices); the last C mod 8 go through CUDA-core kernels (E' and
//             their partial sums; B from recomputed logits), then the same cuBLAS gradients as store-E.
//
// Memory beyond inputs, outputs and gradients: n x ceil(C / 256) float32 partials in the forward
// (16 MiB at n = 1024, C = 1M); per backward chunk n x T bf16 B plus O(T + n) vectors (store-E: plus E',
// 2 bytes x n x C, and a T x D float32 E chunk).
#ifdef OCLEAR_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <oclear/fused_margin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "../cuda/margin_softmax_fused.cuh"
#include "../cuda_sm90/margin_softmax_sm90.cuh"
#include "cuda_glue.h"
#include "margin_softmax_fused.h"

namespace oclear {
namespace {

using namespace cuda_glue;

constexpr const char* kOp = "oclear_ext.margin_softmax_loss (backend='cutlass_sm90'): ";
constexpr int64_t kMaxClassesPerShard = int64_t(1) << 24;  // class ids travel as exact float32

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Classes of a shard that the store-E forward and the backward GEMMs take: TMA wants their N x C (or N x chunk)
// bf16 matrices in 16-byte rows, so a multiple of 8; the last C mod 8 go through CUDA-core kernels.
int64_t gemm_classes(int64_t classes) { return classes / 8 * 8; }

void check_kernel(bool ok, const char* what) { check_launch(ok, kOp, what); }

void check_gemm(int status, const char* what) {
  TORCH_CHECK(status == 0, kOp, what, " failed (CUTLASS status ", status,
              "; 1xx: can_implement, 2xx: initialize, 3xx: run)");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, like.options().dtype(at::kByte));
}

sm90::ShiftArgs shift_args(const MarginParams<double>& margin) {
  const fused::ShiftParams p = fused::make_shift_params(margin);
  return {p.k, p.filtered, p.has_filter, p.filter};
}

// Per-row state both passes need: x^, the rows' label columns in this shard (float32, -1: none) and the
// target kernel's outputs.
struct Rows {
  Normalized xn;
  at::Tensor label_col, target_logit, target_cos, target_exp;
};

Rows prepare_rows(const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& w_inv,
                  const at::Tensor& labels, const cpu::MarginSoftmaxArgs& args, cudaStream_t stream) {
  const int64_t n = embeddings.size(0), d = embeddings.size(1), c_local = weight.size(0);
  const auto f32 = embeddings.options().dtype(at::kFloat);
  Rows r{normalize_rows(embeddings, at::kFloat, stream, kOp), at::Tensor(), new_buffer({n}, f32), new_buffer({n}, f32),
         new_buffer({n}, f32.dtype(at::kDouble))};
  const at::Tensor local = labels - args.class_start;
  const at::Tensor in_shard = (local >= 0).logical_and(local < c_local).logical_and(labels != args.ignore_index);
  r.label_col = at::where(in_shard, local, -1).to(at::kFloat);
  check_kernel(cuda::launch_fused_target(r.xn.x_hat.data_ptr(), weight.data_ptr(), w_inv.data_ptr<float>(),
                                         labels.data_ptr<int64_t>(), n, d, args.class_start, c_local,
                                         args.ignore_index, args.margin,
                                         r.target_logit.data_ptr<float>(), r.target_cos.data_ptr<float>(),
                                         r.target_exp.data_ptr<double>(), stream),
               "target logits");
  return r;
}

}  // namespace

std::string fused_unavailable_reason(const at::Tensor& embeddings, const at::Tensor& weight) {
  if (!sm90::kernels_built()) {
    return "this build has no sm_90a kernels (build with TORCH_CUDA_ARCH_LIST including 9.0a and the "
           "nvidia-cutlass package installed; see docs/install.md)";
  }
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, embeddings.device().index()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, embeddings.device().index()));
  if (major != 9 || minor != 0) {
    return "it needs a compute capability 9.0 GPU (H100 / H200), got " + std::to_string(major) + "." +
           std::to_string(minor);
  }
  if (embeddings.scalar_type() != at::kBFloat16 || weight.scalar_type() != at::kBFloat16) {
    return std::string("it needs bfloat16 embeddings and weight, got ") + c10::toString(embeddings.scalar_type()) +
           " and " + c10::toString(weight.scalar_type());
  }
  const int64_t d = weight.size(1);
  if (d % 8 != 0) return "it needs D to be a multiple of 8 (16-byte rows for TMA), got D = " + std::to_string(d);
  if (!weight.is_contiguous()) return "it needs a contiguous weight (TMA reads rows of D elements)";
  if (reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 != 0) return "it needs a 16-byte aligned weight";
  if (weight.size(0) >= kMaxClassesPerShard) {
    return "it handles fewer than 2^24 classes per weight shard, got " + std::to_string(weight.size(0));
  }
  if (embeddings.size(0) > INT32_MAX) return "it handles at most 2^31 - 1 rows";
  // CUTLASS's own verdict on the arguments, for anything the checks above do not name (no GEMM runs without
  // rows or classes).
  const std::string gemm =
      embeddings.size(0) > 0 && weight.size(0) > 0 ? sm90::refusing_gemm(embeddings.size(0), weight.size(0), d) : "";
  if (!gemm.empty()) {
    return "CUTLASS's " + gemm + " GEMM cannot take N = " + std::to_string(embeddings.size(0)) + ", C = " +
           std::to_string(weight.size(0)) + ", D = " + std::to_string(d);
  }
  return "";
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward(const at::Tensor& embeddings, const at::Tensor& weight,
                                                             const at::Tensor& labels,
                                                             const cpu::MarginSoftmaxArgs& args, at::Tensor* stored) {
  const c10::cuda::CUDAGuard guard(embeddings.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t n = embeddings.size(0), d = embeddings.size(1), c_local = weight.size(0);
  const auto f32 = embeddings.options().dtype(at::kFloat);
  at::Tensor w_inv = inverse_norms(weight, at::kFloat, stream, kOp);
  at::Tensor lse = new_buffer({n}, f32);
  if (n == 0) return {lse, new_buffer({0}, f32), w_inv};
  const Rows rows = prepare_rows(embeddings, weight, w_inv, labels, args, stream);
  if (c_local == 0) {  // an empty shard: lse = log(0) = -inf, as the chunked path gives
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {lse, rows.target_logit, w_inv};
  }
  const at::Tensor class_id = at::arange(c_local, f32);
  const int64_t m_pad = round_up(n, sm90::kTileRows), tiles = (c_local + sm90::kTileClasses - 1) / sm90::kTileClasses;
  at::Tensor partial = new_buffer({tiles * m_pad}, f32);
  if (stored == nullptr) {
    at::Tensor ws = workspace(sm90::forward_workspace_size(n, c_local, d), embeddings);
    check_gemm(sm90::launch_forward(n, c_local, d, rows.xn.x_hat.data_ptr(), weight.data_ptr(),
                                    w_inv.data_ptr<float>(), class_id.data_ptr<float>(),
                                    rows.label_col.data_ptr<float>(), shift_args(args.margin),
                                    partial.data_ptr<float>(), ws.data_ptr(), stream),
               "forward GEMM");
  } else {
    const int64_t ld = round_up(c_local, 8);
    // Asked of the caching allocator itself (it frees its cached blocks and retries before it gives up), so
    // memory it holds unused counts as free, which cudaMemGetInfo would not say.
    at::Tensor e;
    try {
      e = at::empty({n, ld}, embeddings.options());
    } catch (const c10::OutOfMemoryError&) {
      TORCH_CHECK_VALUE(false, kOp, "backward='store' keeps N x C bf16 values (",
                        2.0 * static_cast<double>(n) * static_cast<double>(ld) / (1 << 20), " MiB for N = ", n,
                        ", C = ", c_local, ") but they do not fit in the device's memory: use backward='recompute'");
    }
    const int64_t c_gemm = gemm_classes(c_local);
    if (c_gemm > 0) {
      at::Tensor ws = workspace(sm90::forward_store_workspace_size(n, c_gemm, d), embeddings);
      check_gemm(sm90::launch_forward_store(n, c_gemm, d, rows.xn.x_hat.data_ptr(), weight.data_ptr(),
                                            w_inv.data_ptr<float>(), class_id.data_ptr<float>(),
                                            rows.label_col.data_ptr<float>(), shift_args(args.margin),
                                            partial.data_ptr<float>(), e.data_ptr(), ld, ws.data_ptr(), stream),
                 "forward GEMM (store-E)");
    }
    const int64_t tail_tile = (c_local - 1) / sm90::kTileClasses;
    check_kernel(cuda::launch_fused_store_tail(rows.xn.x_hat.data_ptr(), weight.data_ptr(), w_inv.data_ptr<float>(),
                                               rows.label_col.data_ptr<float>(), n, d, c_gemm, c_local - c_gemm,
                                               fused::make_shift_params(args.margin),
                                               partial.data_ptr<float>() + tail_tile * m_pad,
                                               c_gemm > tail_tile * sm90::kTileClasses, e.data_ptr(), ld, stream),
                 "store-E tail classes");
    *stored = e.narrow(1, 0, c_local);
  }
  at::Tensor true_max = new_buffer({n}, embeddings.options().dtype(at::kInt));
  check_kernel(cuda::launch_fused_finalize(partial.data_ptr<float>(), m_pad, tiles, rows.target_exp.data_ptr<double>(),
                                           n, c_local, args.margin.scale, lse.data_ptr<float>(),
                                           true_max.data_ptr<int32_t>(), stream),
               "row merge");
  check_kernel(cuda::launch_fused_true_max(true_max.data_ptr<int32_t>(), rows.xn.x_hat.data_ptr(), weight.data_ptr(),
                                           w_inv.data_ptr<float>(), labels.data_ptr<int64_t>(), n, d, args.class_start,
                                           c_local, args.ignore_index, args.margin, rows.target_logit.data_ptr<float>(),
                                           lse.data_ptr<float>(), stream),
               "true-max rows");
  return {lse, rows.target_logit, w_inv};
}

std::tuple<at::Tensor, at::Tensor> fused_backward(const at::Tensor& grad_lse, const at::Tensor& grad_target,
                                                  const at::Tensor& embeddings, const at::Tensor& weight,
                                                  const at::Tensor& labels, const at::Tensor& lse,
                                                  const at::Tensor& w_inv, const cpu::MarginSoftmaxArgs& args,
                                                  bool need_grad_embeddings, bool need_grad_weight,
                                                  const at::Tensor& stored) {
  const c10::cuda::CUDAGuard guard(embeddings.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t n = embeddings.size(0), d = embeddings.size(1), c_local = weight.size(0);
  const auto f32 = embeddings.options().dtype(at::kFloat);
  at::Tensor grad_weight = need_grad_weight ? new_buffer({c_local, d}, weight.options()) : at::empty({0}, weight.options());
  at::Tensor grad_x = need_grad_embeddings ? new_buffer({n, d}, embeddings.options())
                                           : at::empty({0}, embeddings.options());
  if (!need_grad_embeddings && !need_grad_weight) return {grad_x, grad_weight};
  if (n == 0 || c_local == 0) {
    if (need_grad_weight) grad_weight.zero_();
    if (need_grad_embeddings) grad_x.zero_();
    return {grad_x, grad_weight};
  }
  const Rows rows = prepare_rows(embeddings, weight, w_inv, labels, args, stream);
  const bool store_mode = stored.defined();
  at::Tensor lse2 = new_buffer({n}, f32), gs = new_buffer({n}, f32), gt = new_buffer({n}, f32);
  at::Tensor row_scale = store_mode ? new_buffer({n}, f32) : at::Tensor();
  at::Tensor lost_row = store_mode ? new_buffer({n}, embeddings.options().dtype(at::kInt)) : at::Tensor();
  check_kernel(cuda::launch_fused_row_grads(rows.target_cos.data_ptr<float>(), rows.label_col.data_ptr<float>(),
                                            grad_lse.data_ptr<float>(), grad_target.data_ptr<float>(),
                                            lse.data_ptr<float>(), n, c_local, args.margin, lse2.data_ptr<float>(),
                                            gs.data_ptr<float>(), gt.data_ptr<float>(),
                                            store_mode ? row_scale.data_ptr<float>() : nullptr,
                                            store_mode ? lost_row.data_ptr<int32_t>() : nullptr, stream),
               "row gradients");
  if (store_mode) {
    TORCH_CHECK_VALUE(stored.dim() == 2 && stored.size(0) == n && stored.size(1) == c_local &&
                          stored.scalar_type() == at::kBFloat16 && stored.stride(1) == 1 &&
                          stored.device() == embeddings.device(),
                      kOp, "stored_exp must be the forward's (N, C) bfloat16 output, got shape ", stored.sizes());
  }
  const at::Tensor class_id = at::arange(c_local, f32);
  // Chunks of whole 256-class tiles: B (n x T bf16) is 32 MiB at the automatic size, so it is still in L2
  // when the two gradient GEMMs read it back.
  const int64_t chunk = args.class_chunk > 0 ? round_up(std::min(args.class_chunk, c_local), sm90::kTileClasses)
                                             : std::max<int64_t>(sm90::kTileClasses,
                                                                 (int64_t(16) << 20) / n / sm90::kTileClasses *
                                                                     sm90::kTileClasses);
  const int64_t t_max = std::min(chunk, round_up(c_local, sm90::kTileClasses));
  const int64_t ld = round_up(t_max, 8), t_pad = round_up(t_max, sm90::kTileClasses);
  const int64_t row_tiles = (n + sm90::kTileRows - 1) / sm90::kTileRows;
  at::Tensor b = new_buffer({n * ld}, embeddings.options());
  at::Tensor r_partial = new_buffer({row_tiles * t_pad}, f32);
  at::Tensor beta = new_buffer({t_max}, f32);
  at::Tensor grad_x_hat = need_grad_embeddings ? at::zeros({n, d}, f32) : at::Tensor();
  at::Tensor grad_x_hat_part = need_grad_embeddings ? new_buffer({n, d}, f32) : at::Tensor();
  at::Tensor ws_recompute = workspace(sm90::recompute_workspace_size(n, t_max, d), embeddings);
  at::Tensor ws_weight = workspace(sm90::weight_grad_workspace_size(t_max, n, d), embeddings);
  const sm90::ShiftArgs shift = shift_args(args.margin);
  const auto* w_bytes = static_cast<const char*>(weight.data_ptr());
  // Recompute mode: four GEMMs per step over the classes its GEMMs take (a multiple of 8).
  const int64_t c_gemm = store_mode ? 0 : gemm_classes(c_local);
  for (int64_t c0 = 0; c0 < c_gemm; c0 += t_max) {
    const int64_t t = std::min(t_max, c_gemm - c0);
    const void* w_chunk = w_bytes + c0 * d * weight.element_size();
    check_gemm(sm90::launch_recompute(n, t, d, rows.xn.x_hat.data_ptr(), w_chunk, w_inv.data_ptr<float>() + c0,
                                      class_id.data_ptr<float>() + c0, rows.label_col.data_ptr<float>(),
                                      lse2.data_ptr<float>(), gs.data_ptr<float>(), gt.data_ptr<float>(), shift,
                                      b.data_ptr(), ld, r_partial.data_ptr<float>(), ws_recompute.data_ptr(), stream),
               "backward recompute GEMM");
    if (need_grad_embeddings) {
      const at::Tensor b_chunk = b.as_strided({n, t}, {ld, 1});
      mm_into(grad_x_hat_part, b_chunk, weight.narrow(0, c0, t));
      grad_x_hat.add_(grad_x_hat_part);
    }
    if (need_grad_weight) {
      check_kernel(cuda::launch_fused_projection(r_partial.data_ptr<float>(), row_tiles, round_up(t, sm90::kTileClasses),
                                                 w_inv.data_ptr<float>() + c0, t, beta.data_ptr<float>(), stream),
                   "projection coefficients");
      check_gemm(sm90::launch_weight_grad(t, n, d, b.data_ptr(), ld, rows.xn.x_hat.data_ptr(), w_chunk,
                                          beta.data_ptr<float>(),
                                          static_cast<char*>(grad_weight.data_ptr()) + c0 * d * weight.element_size(),
                                          ws_weight.data_ptr(), stream),
                 "weight gradient GEMM");
    }
  }
  // Store-E mode (three GEMMs in all: the forward's, and dx^ and E per chunk here), and recompute mode's last
  // classes (fewer than 8): B from a CUDA-core kernel (from E', or from logits recomputed there), then
  // dx^ += B W_chunk and E = B^T x^ (cuBLAS, float32 t x d, in L2 at the automatic chunk) with the chunked
  // path's projection kernel.
  at::Tensor e_rows = need_grad_weight && c_gemm < c_local ? new_buffer({std::min(t_max, c_local - c_gemm), d}, f32)
                                                           : at::Tensor();
  for (int64_t c0 = c_gemm; c0 < c_local; c0 += t_max) {
    const int64_t t = std::min(t_max, c_local - c0);
    const at::Tensor w_chunk = weight.narrow(0, c0, t);
    check_kernel(cuda::launch_fused_stored_grad(store_mode ? stored.data_ptr() : nullptr,
                                                store_mode ? stored.stride(0) : 0, c0, t, n,
                                                store_mode ? row_scale.data_ptr<float>() : nullptr,
                                                rows.label_col.data_ptr<float>(), gt.data_ptr<float>(),
                                                w_inv.data_ptr<float>() + c0,
                                                store_mode ? lost_row.data_ptr<int32_t>() : nullptr,
                                                rows.xn.x_hat.data_ptr(), w_chunk.data_ptr(), d, lse2.data_ptr<float>(),
                                                gs.data_ptr<float>(), fused::make_shift_params(args.margin),
                                                b.data_ptr(), ld, stream),
                 store_mode ? "stored gradient" : "tail-class gradient");
    const at::Tensor b_chunk = b.as_strided({n, t}, {ld, 1});
    if (need_grad_embeddings) {
      mm_into(grad_x_hat_part, b_chunk, w_chunk);
      grad_x_hat.add_(grad_x_hat_part);
    }
    if (need_grad_weight) {
      at::Tensor e = e_rows.narrow(0, 0, t);
      mm_into(e, b_chunk.t(), rows.xn.x_hat);
      check_launch(cuda::launch_project_weight_grad(cuda::Dtype::kBFloat16, e.data_ptr(), w_chunk.data_ptr(), t, d, d,
                                                    1, w_inv.data_ptr<float>() + c0, grad_weight[c0].data_ptr(),
                                                    stream),
                   kOp, "weight gradient projection");
    }
  }
  if (need_grad_embeddings) {
    check_launch(cuda::launch_embedding_grad(cuda::Dtype::kBFloat16, grad_x_hat.data_ptr(), embeddings.data_ptr(), n, d,
                                             embeddings.stride(0), embeddings.stride(1), rows.xn.x_inv.data_ptr(),
                                             grad_x.data_ptr(), stream),
                 kOp, "embedding gradient projection");
  }
  return {grad_x, grad_weight};
}

}  // namespace oclear

#endif  // OCLEAR_WITH_CUDA

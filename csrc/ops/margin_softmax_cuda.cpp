// CUDA registration of the margin-softmax private ops (schemas in margin_softmax.cpp), compiled
// only when setup.py builds the CUDA kernels (OCLEAR_WITH_CUDA).
//
// Algorithm (docs/design.md#margin-softmax): the classes are walked in chunks of T; per chunk
//   forward:  S = x^ @ W_c^T            ATen GEMM (cuBLAS), float32 output, then the forward
//                                       epilogue kernel folds S into per-row online-softmax states
//   backward: S = x^ @ W_c^T            recomputed, then the backward epilogue writes
//             B = dLoss/dcos * w_inv    (in place for float32 / float64, else a 16-bit copy)
//             dx^ += B @ W_c            ATen GEMM, float32 accumulation across chunks
//             E    = B^T @ x^           ATen GEMM, float32, then the projection kernel writes
//                                       dW_c = E - w_c w_inv^2 (w_c . E) in the weight's dtype
// x^ is the input dtype (bfloat16 / float16 GEMMs run on tensor cores; float32 GEMMs use TF32
// exactly when torch.backends.cuda.matmul.allow_tf32 allows it, since ATen's mm honours it);
// S, E and all statistics are float32 (float64 for float64 inputs): the 16-bit GEMMs produce
// float32 through aten::mm's out_dtype overload. The weight is read in place (any strides),
// scaled by its inverse norms inside the epilogues: no normalised copy of W, and memory beyond
// inputs, outputs and gradients is O(N x T + T x D + N x D), independent of C.
// The kernels are in csrc/cuda/margin_softmax.cu (raw pointers, no torch headers).
//
// Op arguments: class_chunk (classes per chunk, 0 = automatic) and check_labels (the label range check,
// one synchronisation; see check_labels_on_device). Debug switch (read at every call; not for
// production): OCLEAR_CUDA_POISON=1 fills every output and scratch buffer with NaN before the kernels,
// so an element a kernel fails to write shows up as NaN.
#ifdef OCLEAR_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "../cuda/margin_softmax.cuh"
#include "cuda_glue.h"
#include "margin_softmax_checks.h"
#include "margin_softmax_fused.h"

namespace oclear {
namespace {

using namespace cuda_glue;

constexpr const char* kOp = "oclear_ext.margin_softmax_loss: ";

cuda::Dtype to_dtype(at::ScalarType t) { return cuda_glue::to_dtype(t, kOp); }
void check_launch(bool dispatched, const char* what) { cuda_glue::check_launch(dispatched, kOp, what); }

// Labels must be class ids in [0, num_classes) or ignore_index. The kernels are memory-safe
// whatever the labels (a label is only ever compared with the chunk's class range, never used as
// an address), so this check is about a clear error, not safety. It costs one device-to-host read
// (a stream synchronisation) per call; it is skipped while the stream is being captured into a
// CUDA graph (a sync is illegal there) and with the op's check_labels=False.
void check_labels_on_device(const at::Tensor& labels, int64_t num_classes, int64_t ignore_index,
                            cudaStream_t stream) {
  const int64_t n = labels.numel();
  if (n == 0) return;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;
  at::Tensor first_bad = at::full({1}, n, labels.options());
  check_launch(cuda::launch_find_bad_label(labels.data_ptr<int64_t>(), n, num_classes, ignore_index,
                                           first_bad.data_ptr<int64_t>(), stream),
               "label check");
  const int64_t i = first_bad.item<int64_t>();
  if (i < n) {
    const int64_t y = labels[i].item<int64_t>();
    TORCH_CHECK_INDEX(false, kOp, "labels[", i, "] = ", y, " is out of range: expected a class id in [0, ",
                      num_classes, ") or ignore_index = ", ignore_index);
  }
}

// Whether this call runs the fused CUTLASS kernels: only when asked for ("auto" keeps the chunked path until
// a GPU run has verified them); asked for and unable to run is an error that says why.
bool use_fused(MarginBackend backend, const at::Tensor& embeddings, const at::Tensor& weight) {
  if (backend != MarginBackend::kCutlassSm90) return false;
  const std::string reason = fused_unavailable_reason(embeddings, weight);
  TORCH_CHECK_VALUE(reason.empty(), kOp, "backend='cutlass_sm90' cannot run this call: ", reason);
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels_in,
    int64_t class_start, int64_t num_classes, double scale, double m1, double m2, double m3,
    std::optional<double> interclass_filter, int64_t ignore_index, bool straight_through, int64_t class_chunk_arg,
    bool check_labels, c10::string_view backend) {
  const bool fused = use_fused(parse_margin_backend(backend, embeddings), embeddings, weight);
  const cpu::MarginSoftmaxArgs args = check_problem(embeddings, weight, labels_in, class_start, num_classes,
                                                    scale, m1, m2, m3, interclass_filter, ignore_index,
                                                    straight_through, class_chunk_arg, check_labels);
  const c10::cuda::CUDAGuard guard(embeddings.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor labels = labels_in.contiguous();
  if (check_labels) check_labels_on_device(labels, num_classes, ignore_index, stream);
  if (fused) return fused_forward(embeddings, weight, labels, args);

  const int64_t n = embeddings.size(0), d = embeddings.size(1), c_local = weight.size(0);
  const at::ScalarType acc = at::toOpMathType(embeddings.scalar_type());
  const cuda::Dtype acc_dtype = to_dtype(acc);
  const auto acc_opts = embeddings.options().dtype(acc);

  // A float32 weight beside 16-bit embeddings is rounded to their dtype chunk by chunk (the GEMMs run on
  // the 16-bit chunk; its inverse norms are the rounded rows'), as the CPU op does (class_chunks.h).
  const bool mixed = weight.scalar_type() != embeddings.scalar_type();
  at::Tensor w_inv = mixed ? new_buffer({c_local}, acc_opts) : inverse_norms(weight, acc, stream, kOp);
  at::Tensor lse = new_buffer({n}, acc_opts);
  at::Tensor target = new_buffer({n}, acc_opts);
  if (n == 0) {
    if (mixed) inverse_norms_into(weight.to(embeddings.scalar_type()), w_inv, stream, kOp);
    return {lse, target, w_inv};
  }

  const Normalized xn = normalize_rows(embeddings, acc, stream, kOp);
  const int64_t chunk = class_chunk(n, d, c_local, args.class_chunk);
  at::Tensor scores = new_buffer({n * chunk}, acc_opts);
  at::Tensor row_max = new_buffer({n}, acc_opts);
  at::Tensor row_sum = new_buffer({n}, acc_opts);
  for (int64_t c0 = 0; c0 < c_local; c0 += chunk) {
    const int64_t t = std::min(chunk, c_local - c0);
    at::Tensor s = scores.narrow(0, 0, n * t).view({n, t});
    const at::Tensor wt = operand_chunk(weight, c0, t, embeddings.scalar_type());
    if (mixed) inverse_norms_into(wt, w_inv.narrow(0, c0, t), stream, kOp);
    mm_into(s, xn.x_hat, wt.t());
    const bool last = c0 + t >= c_local;
    check_launch(cuda::launch_forward_epilogue(
                     acc_dtype, s.data_ptr(), n, t, static_cast<const char*>(w_inv.data_ptr()) + c0 * w_inv.element_size(),
                     labels.data_ptr<int64_t>(), class_start + c0, ignore_index, args.margin, row_max.data_ptr(),
                     row_sum.data_ptr(), target.data_ptr(), last ? lse.data_ptr() : nullptr, c0 == 0, stream),
                 "forward epilogue");
  }
  return {lse, target, w_inv};
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_lse_in, const at::Tensor& grad_target_in, const at::Tensor& embeddings,
    const at::Tensor& weight, const at::Tensor& labels_in, const at::Tensor& lse_in,
    const at::Tensor& w_inv_in, int64_t class_start, int64_t num_classes, double scale, double m1,
    double m2, double m3, std::optional<double> interclass_filter, int64_t ignore_index,
    bool straight_through, int64_t class_chunk_arg, bool check_labels, c10::string_view backend,
    bool need_grad_embeddings, bool need_grad_weight) {
  const bool fused = use_fused(parse_margin_backend(backend, embeddings), embeddings, weight);
  const cpu::MarginSoftmaxArgs args = check_problem(embeddings, weight, labels_in, class_start, num_classes,
                                                    scale, m1, m2, m3, interclass_filter, ignore_index,
                                                    straight_through, class_chunk_arg, check_labels);
  const at::ScalarType acc = at::toOpMathType(embeddings.scalar_type());
  const int64_t n = embeddings.size(0), d = embeddings.size(1), c_local = weight.size(0);
  check_row_vector(grad_lse_in, n, acc, "grad_lse");
  check_row_vector(grad_target_in, n, acc, "grad_target");
  check_row_vector(lse_in, n, acc, "lse");
  check_row_vector(w_inv_in, c_local, acc, "weight_inv_norm");
  for (const at::Tensor* t : {&grad_lse_in, &grad_target_in, &lse_in, &w_inv_in}) {
    TORCH_CHECK_VALUE(t->device() == weight.device(), "margin_softmax_backward: every tensor must be on ",
                      weight.device(), ", got one on ", t->device());
  }
  const c10::cuda::CUDAGuard guard(embeddings.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor labels = labels_in.contiguous();
  if (check_labels) check_labels_on_device(labels, num_classes, ignore_index, stream);
  if (fused) {
    return fused_backward(grad_lse_in.contiguous(), grad_target_in.contiguous(), embeddings, weight, labels,
                          lse_in.contiguous(), w_inv_in.contiguous(), args, need_grad_embeddings, need_grad_weight);
  }

  const cuda::Dtype dtype = to_dtype(embeddings.scalar_type());
  const cuda::Dtype acc_dtype = to_dtype(acc);
  const auto acc_opts = embeddings.options().dtype(acc);
  at::Tensor grad_weight = need_grad_weight ? new_buffer({c_local, d}, weight.options())
                                            : at::empty({0}, weight.options());
  at::Tensor grad_x = need_grad_embeddings ? new_buffer({n, d}, embeddings.options())
                                           : at::empty({0}, embeddings.options());
  if (!need_grad_embeddings && !need_grad_weight) return {grad_x, grad_weight};
  if (n == 0) {  // no rows: dW = 0 (and dx is empty)
    if (need_grad_weight) grad_weight.zero_();
    return {grad_x, grad_weight};
  }

  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor w_inv = w_inv_in.contiguous();
  const at::Tensor grad_lse = grad_lse_in.contiguous();
  const at::Tensor grad_target = grad_target_in.contiguous();
  const Normalized xn = normalize_rows(embeddings, acc, stream, kOp);
  const int64_t chunk = class_chunk(n, d, c_local, args.class_chunk);
  const bool low_precision = embeddings.scalar_type() != acc;

  at::Tensor scores = new_buffer({n * chunk}, acc_opts);
  at::Tensor operand = low_precision ? new_buffer({n * chunk}, embeddings.options()) : scores;
  at::Tensor grad_x_hat = need_grad_embeddings ? at::zeros({n, d}, acc_opts) : at::Tensor();
  at::Tensor grad_x_hat_part = need_grad_embeddings && low_precision ? new_buffer({n, d}, acc_opts) : at::Tensor();
  at::Tensor e_buffer = need_grad_weight ? new_buffer({chunk * d}, acc_opts) : at::Tensor();
  const char* w_inv_bytes = static_cast<const char*>(w_inv.data_ptr());

  const bool mixed = weight.scalar_type() != embeddings.scalar_type();  // see forward_cuda
  for (int64_t c0 = 0; c0 < c_local; c0 += chunk) {
    const int64_t t = std::min(chunk, c_local - c0);
    const at::Tensor wt = operand_chunk(weight, c0, t, embeddings.scalar_type());
    const void* w_inv_chunk = w_inv_bytes + c0 * w_inv.element_size();
    at::Tensor s = scores.narrow(0, 0, n * t).view({n, t});
    mm_into(s, xn.x_hat, wt.t());
    at::Tensor b = operand.narrow(0, 0, n * t).view({n, t});
    check_launch(cuda::launch_backward_epilogue(acc_dtype, dtype, s.data_ptr(), b.data_ptr(), n, t, w_inv_chunk,
                                                labels.data_ptr<int64_t>(), class_start + c0, ignore_index,
                                                args.margin, lse.data_ptr(), grad_lse.data_ptr(),
                                                grad_target.data_ptr(), stream),
                 "backward epilogue");
    if (need_grad_embeddings) {
      if (low_precision) {  // float32 accumulation across chunks of 16-bit GEMMs
        mm_into(grad_x_hat_part, b, wt);
        grad_x_hat.add_(grad_x_hat_part);
      } else {
        grad_x_hat.addmm_(b, wt);
      }
    }
    if (need_grad_weight) {
      at::Tensor e = e_buffer.narrow(0, 0, t * d).view({t, d});
      mm_into(e, b.t(), xn.x_hat);
      // The projection reads w in the gradient's dtype: a float32 weight's gradient is projected through
      // its rounded rows, widened back to float32 (the gradient at the rows the forward used).
      const at::Tensor wp = mixed ? wt.to(weight.scalar_type()) : wt;
      check_launch(cuda::launch_project_weight_grad(to_dtype(weight.scalar_type()), e.data_ptr(), wp.data_ptr(), t, d,
                                                    wp.stride(0), wp.stride(1), w_inv_chunk, grad_weight[c0].data_ptr(),
                                                    stream),
                   "weight gradient projection");
    }
  }
  if (need_grad_embeddings) {
    check_launch(cuda::launch_embedding_grad(dtype, grad_x_hat.data_ptr(), embeddings.data_ptr(), n, d,
                                             embeddings.stride(0), embeddings.stride(1), xn.x_inv.data_ptr(),
                                             grad_x.data_ptr(), stream),
                 "embedding gradient projection");
  }
  return {grad_x, grad_weight};
}

}  // namespace

// The store-E ops: fused kernels only (backend must be "cutlass_sm90").
void require_fused_for_store(c10::string_view backend, const at::Tensor& embeddings, const at::Tensor& weight) {
  const MarginBackend b = parse_margin_backend(backend, embeddings);
  TORCH_CHECK_VALUE(b == MarginBackend::kCutlassSm90, kOp, "backward='store' needs backend='cutlass_sm90', got '",
                    backend, "'");
  use_fused(b, embeddings, weight);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_stored_cuda(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels_in, int64_t class_start,
    int64_t num_classes, double scale, double m1, double m2, double m3, std::optional<double> interclass_filter,
    int64_t ignore_index, bool straight_through, int64_t class_chunk_arg, bool check_labels,
    c10::string_view backend) {
  require_fused_for_store(backend, embeddings, weight);
  const cpu::MarginSoftmaxArgs args = check_problem(embeddings, weight, labels_in, class_start, num_classes,
                                                    scale, m1, m2, m3, interclass_filter, ignore_index,
                                                    straight_through, class_chunk_arg, check_labels);
  const c10::cuda::CUDAGuard guard(embeddings.device());
  const at::Tensor labels = labels_in.contiguous();
  if (check_labels) check_labels_on_device(labels, num_classes, ignore_index, c10::cuda::getCurrentCUDAStream().stream());
  // Replaced by the forward's E' except for an empty batch or shard, where it already has the shape (N, C).
  const int64_t n = embeddings.size(0), c_local = weight.size(0);
  at::Tensor stored = at::empty({n == 0 || c_local == 0 ? n : 0, c_local}, embeddings.options());
  auto [lse, target, w_inv] = fused_forward(embeddings, weight, labels, args, &stored);
  return {lse, target, w_inv, stored};
}

std::tuple<at::Tensor, at::Tensor> backward_stored_cuda(
    const at::Tensor& grad_lse, const at::Tensor& grad_target, const at::Tensor& embeddings, const at::Tensor& weight,
    const at::Tensor& labels_in, const at::Tensor& lse, const at::Tensor& w_inv, const at::Tensor& stored,
    int64_t class_start, int64_t num_classes, double scale, double m1, double m2, double m3,
    std::optional<double> interclass_filter, int64_t ignore_index, bool straight_through, int64_t class_chunk_arg,
    bool check_labels, c10::string_view backend, bool need_grad_embeddings, bool need_grad_weight) {
  require_fused_for_store(backend, embeddings, weight);
  const cpu::MarginSoftmaxArgs args = check_problem(embeddings, weight, labels_in, class_start, num_classes,
                                                    scale, m1, m2, m3, interclass_filter, ignore_index,
                                                    straight_through, class_chunk_arg, check_labels);
  const int64_t n = embeddings.size(0);
  check_row_vector(grad_lse, n, at::kFloat, "grad_lse");
  check_row_vector(grad_target, n, at::kFloat, "grad_target");
  check_row_vector(lse, n, at::kFloat, "lse");
  check_row_vector(w_inv, weight.size(0), at::kFloat, "weight_inv_norm");
  for (const at::Tensor* t : {&grad_lse, &grad_target, &lse, &w_inv, &stored}) {
    TORCH_CHECK_VALUE(t->device() == weight.device(), "margin_softmax_backward_stored: every tensor must be on ",
                      weight.device(), ", got one on ", t->device());
  }
  const c10::cuda::CUDAGuard guard(embeddings.device());
  // The labels were checked by the forward that produced `stored`.
  return fused_backward(grad_lse.contiguous(), grad_target.contiguous(), embeddings, weight, labels_in.contiguous(),
                        lse.contiguous(), w_inv.contiguous(), args, need_grad_embeddings, need_grad_weight, stored);
}

TORCH_LIBRARY_IMPL(oclear, CUDA, m) {
  m.impl("margin_softmax_forward", &forward_cuda);
  m.impl("margin_softmax_backward", &backward_cuda);
  m.impl("margin_softmax_forward_stored", &forward_stored_cuda);
  m.impl("margin_softmax_backward_stored", &backward_stored_cuda);
}

}  // namespace oclear

#endif  // OCLEAR_WITH_CUDA

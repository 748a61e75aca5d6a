// Torch glue of the fused margin softmax: schemas, argument checks, backend registration.
//
// The private ops work on a block of classes [class_start, class_start + weight.size(0)) of a
// problem with num_classes classes in all, so the single-device loss (class_start = 0,
// num_classes = C) and a class-sharded classifier (one block per rank) share them unchanged.
// oclear_ext/_ops/margin_softmax.py registers fake kernels and autograd and builds the loss.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include <oclear/checks.h>
#include <oclear/margin.h>

#include "../cpu/class_chunks.h"
#include "../cpu/margin_softmax.h"
#include "margin_softmax_checks.h"
#include "margin_softmax_fused.h"

namespace oclear {
namespace {

constexpr const char* kOp = "oclear_ext.margin_softmax_loss: ";

void check_float_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, kOp, name, " must be a 2-D tensor, got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                   kOp, name, " must be float32, float64, bfloat16 or float16, got ", dt);
}

}  // namespace

// Everything both ops check: shapes, dtypes, devices, the class block, labels and margins.
cpu::MarginSoftmaxArgs check_problem(const at::Tensor& embeddings, const at::Tensor& weight,
                                     const at::Tensor& labels, int64_t class_start,
                                     int64_t num_classes, double scale, double m1, double m2,
                                     double m3, std::optional<double> interclass_filter,
                                     int64_t ignore_index, bool straight_through, int64_t class_chunk,
                                     bool check_labels) {
  check_float_matrix(embeddings, "embeddings");
  check_float_matrix(weight, "weight");
  TORCH_CHECK_TYPE(cpu::compatible_weight_dtype(embeddings.scalar_type(), weight.scalar_type()), kOp,
                   "weight must have the embeddings' dtype, or be float32 beside 16-bit embeddings, got weight ",
                   weight.scalar_type(), " and embeddings ", embeddings.scalar_type());
  TORCH_CHECK_VALUE(embeddings.size(1) >= 1, kOp, "embedding dimension must be >= 1, got shape ",
                    embeddings.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == embeddings.size(1), kOp,
                    "weight must have shape (num_classes, D) with the embeddings' D = ",
                    embeddings.size(1), ", got weight shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) >= 1, kOp,
                    "weight holds no classes (an empty class shard), got shape ", weight.sizes());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, kOp, "labels must be int64, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == embeddings.size(0), kOp,
                    "labels must have shape (N,) = (", embeddings.size(0),
                    ",) to match the embeddings, got ", labels.sizes());
  TORCH_CHECK_VALUE(embeddings.device() == weight.device() && labels.device() == weight.device(),
                    kOp, "embeddings, weight and labels must be on one device, got embeddings on ",
                    embeddings.device(), ", weight on ", weight.device(), ", labels on ",
                    labels.device());
  TORCH_CHECK_VALUE(class_start >= 0 && class_start + weight.size(0) <= num_classes, kOp,
                    "the weight block [", class_start, ", ", class_start + weight.size(0),
                    ") must lie within the ", num_classes, " classes");
  const std::string margin_error = margin_settings_error(
      scale, m1, m2, m3, interclass_filter.has_value(), interclass_filter.value_or(0.0));
  TORCH_CHECK_VALUE(margin_error.empty(), kOp, margin_error);
  TORCH_CHECK_VALUE(class_chunk >= 0, kOp, "class_chunk must be >= 0 (0 = automatic), got ", class_chunk);

  if (check_labels && labels.device().is_cpu()) {
    const at::Tensor lab = labels.contiguous();
    const int64_t* p = lab.data_ptr<int64_t>();
    for (int64_t i = 0; i < lab.numel(); ++i) {
      TORCH_CHECK_INDEX(p[i] == ignore_index || (p[i] >= 0 && p[i] < num_classes), kOp,
                        "labels[", i, "] = ", p[i], " is out of range: expected a class id in [0, ",
                        num_classes, ") or ignore_index = ", ignore_index);
    }
  }
  return cpu::MarginSoftmaxArgs{
      class_start, ignore_index,
      make_margin_params(scale, m1, m2, m3, interclass_filter.has_value(),
                         interclass_filter.value_or(0.0), straight_through),
      class_chunk};
}

void check_row_vector(const at::Tensor& t, int64_t n, at::ScalarType acc, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, "margin_softmax_backward: ", name,
                    " must have shape (", n, ",), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == acc, "margin_softmax_backward: ", name, " must be ", acc,
                   ", got ", t.scalar_type());
}

MarginBackend parse_margin_backend(c10::string_view name, const at::Tensor& embeddings) {
  MarginBackend b;
  if (name == "auto") {
    b = MarginBackend::kAuto;
  } else if (name == "chunked") {
    b = MarginBackend::kChunked;
  } else if (name == "cutlass_sm90") {
    b = MarginBackend::kCutlassSm90;
  } else {
    TORCH_CHECK_VALUE(false, kOp, "backend must be one of 'auto', 'chunked', 'cutlass_sm90', got '", name, "'");
  }
  TORCH_CHECK_VALUE(b != MarginBackend::kCutlassSm90 || embeddings.is_cuda(), kOp,
                    "backend='cutlass_sm90' selects CUDA kernels (compute capability 9.0), but the embeddings are on ",
                    embeddings.device());
  return b;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
    int64_t class_start, int64_t num_classes, double scale, double m1, double m2, double m3,
    std::optional<double> interclass_filter, int64_t ignore_index, bool straight_through,
    int64_t class_chunk, bool check_labels, c10::string_view backend) {
  parse_margin_backend(backend, embeddings);
  const cpu::MarginSoftmaxArgs args =
      check_problem(embeddings, weight, labels, class_start, num_classes, scale, m1, m2, m3,
                    interclass_filter, ignore_index, straight_through, class_chunk, check_labels);
  return cpu::margin_softmax_forward(embeddings, weight, labels, args);
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_lse, const at::Tensor& grad_target, const at::Tensor& embeddings,
    const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& lse,
    const at::Tensor& weight_inv_norm, int64_t class_start, int64_t num_classes, double scale,
    double m1, double m2, double m3, std::optional<double> interclass_filter, int64_t ignore_index,
    bool straight_through, int64_t class_chunk, bool check_labels, c10::string_view backend,
    bool need_grad_embeddings, bool need_grad_weight) {
  parse_margin_backend(backend, embeddings);
  const cpu::MarginSoftmaxArgs args =
      check_problem(embeddings, weight, labels, class_start, num_classes, scale, m1, m2, m3,
                    interclass_filter, ignore_index, straight_through, class_chunk, check_labels);
  const at::ScalarType acc = at::toOpMathType(embeddings.scalar_type());
  const int64_t n = embeddings.size(0);
  check_row_vector(grad_lse, n, acc, "grad_lse");
  check_row_vector(grad_target, n, acc, "grad_target");
  check_row_vector(lse, n, acc, "lse");
  check_row_vector(weight_inv_norm, weight.size(0), acc, "weight_inv_norm");
  return cpu::margin_softmax_backward(grad_lse, grad_target, embeddings, weight, labels, lse,
                                      weight_inv_norm, args, need_grad_embeddings,
                                      need_grad_weight);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(oclear, m) {
  m.def(
      "margin_softmax_forward(Tensor embeddings, Tensor weight, Tensor labels, int class_start, "
      "int num_classes, float scale, float m1, float m2, float m3, float? interclass_filter, "
      "int ignore_index, bool straight_through, int class_chunk=0, bool check_labels=True, "
      "str backend=\"auto\") -> "
      "(Tensor lse, Tensor target_logit, "
      "Tensor weight_inv_norm)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "margin_softmax_backward(Tensor grad_lse, Tensor grad_target, Tensor embeddings, "
      "Tensor weight, Tensor labels, Tensor lse, Tensor weight_inv_norm, int class_start, "
      "int num_classes, float scale, float m1, float m2, float m3, float? interclass_filter, "
      "int ignore_index, bool straight_through, int class_chunk, bool check_labels, str backend, "
      "bool need_grad_embeddings, bool need_grad_weight) -> (Tensor grad_embeddings, Tensor grad_weight)",
      {at::Tag::pt2_compliant_tag});
  // The store-E mode (backward="store"): the forward also returns the bf16 E' = exp(s cos - s) * w_inv (N x C),
  // which the backward reads instead of recomputing the logits. Fused CUDA kernels only.
  m.def(
      "margin_softmax_forward_stored(Tensor embeddings, Tensor weight, Tensor labels, int class_start, "
      "int num_classes, float scale, float m1, float m2, float m3, float? interclass_filter, "
      "int ignore_index, bool straight_through, int class_chunk=0, bool check_labels=True, "
      "str backend=\"cutlass_sm90\") -> (Tensor lse, Tensor target_logit, Tensor weight_inv_norm, Tensor stored_exp)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "margin_softmax_backward_stored(Tensor grad_lse, Tensor grad_target, Tensor embeddings, "
      "Tensor weight, Tensor labels, Tensor lse, Tensor weight_inv_norm, Tensor stored_exp, int class_start, "
      "int num_classes, float scale, float m1, float m2, float m3, float? interclass_filter, "
      "int ignore_index, bool straight_through, int class_chunk, bool check_labels, str backend, "
      "bool need_grad_embeddings, bool need_grad_weight) -> (Tensor grad_embeddings, Tensor grad_weight)",
      {at::Tag::pt2_compliant_tag});
}

// The store-E ops exist only for the fused CUDA kernels; on the CPU they say so.
[[noreturn]] void store_mode_unavailable(c10::string_view backend, const at::Tensor& embeddings) {
  parse_margin_backend(backend, embeddings);  // names a bad or CUDA-only backend first
  TORCH_CHECK_VALUE(false, kOp, "backward='store' needs backend='cutlass_sm90' on a CUDA device, got backend='",
                    backend, "' on ", embeddings.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_stored_cpu(
    const at::Tensor& embeddings, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, double, double,
    double, std::optional<double>, int64_t, bool, int64_t, bool, c10::string_view backend) {
  store_mode_unavailable(backend, embeddings);
}

std::tuple<at::Tensor, at::Tensor> backward_stored_cpu(
    const at::Tensor&, const at::Tensor&, const at::Tensor& embeddings, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, double, double, double,
    std::optional<double>, int64_t, bool, int64_t, bool, c10::string_view backend, bool, bool) {
  store_mode_unavailable(backend, embeddings);
}

TORCH_LIBRARY_IMPL(oclear, CPU, m) {
  m.impl("margin_softmax_forward", &forward_cpu);
  m.impl("margin_softmax_backward", &backward_cpu);
  m.impl("margin_softmax_forward_stored", &forward_stored_cpu);
  m.impl("margin_softmax_backward_stored", &backward_stored_cpu);
}

}  // namespace oclear

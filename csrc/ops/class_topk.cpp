// Torch glue of the hardest-class scoring op: schema, argument checks, CPU registration.
// oclear_ext/_ops/class_topk.py registers the fake kernel and the public wrapper.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../cpu/class_chunks.h"
#include "../cpu/class_topk.h"
#include "class_topk_checks.h"

namespace oclear {
namespace {

constexpr const char* kOp = "oclear_ext.hardest_classes: ";

void check_float_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, kOp, name, " must be a 2-D tensor, got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, kOp, name,
                   " must be float32, float64, bfloat16 or float16, got ", dt);
}

}  // namespace

void check_class_topk(const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& exclude,
                      int64_t k, int64_t class_chunk) {
  TORCH_CHECK_VALUE(class_chunk >= 0, kOp, "class_chunk must be >= 0 (0 = automatic), got ", class_chunk);
  check_float_matrix(embeddings, "embeddings");
  check_float_matrix(weight, "weight");
  TORCH_CHECK_TYPE(cpu::compatible_weight_dtype(embeddings.scalar_type(), weight.scalar_type()), kOp,
                   "weight must have the embeddings' dtype, or be float32 beside 16-bit embeddings, got weight ",
                   weight.scalar_type(), " and embeddings ", embeddings.scalar_type());
  TORCH_CHECK_VALUE(embeddings.size(0) >= 1, kOp, "needs at least one embedding row to score classes against");
  TORCH_CHECK_VALUE(embeddings.size(1) >= 1 && weight.size(1) == embeddings.size(1), kOp,
                    "weight must have shape (C, D) with the embeddings' D = ", embeddings.size(1),
                    ", got weight shape ", weight.sizes());
  TORCH_CHECK_VALUE(embeddings.device() == weight.device() && exclude.device() == weight.device(), kOp,
                    "embeddings, weight and exclude must be on one device, got ", embeddings.device(), ", ",
                    weight.device(), ", ", exclude.device());
  TORCH_CHECK_TYPE(exclude.scalar_type() == at::kLong && exclude.dim() == 1, kOp,
                   "exclude must be a 1-D int64 tensor of class ids, got ", exclude.scalar_type(), " of shape ",
                   exclude.sizes());
  const int64_t c = weight.size(0);
  if (exclude.device().is_cpu()) {
    const at::Tensor ex = exclude.contiguous();
    const int64_t* p = ex.data_ptr<int64_t>();
    for (int64_t i = 0; i < ex.numel(); ++i) {
      TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < c, kOp, "exclude[", i, "] = ", p[i], " is not a class id in [0, ", c,
                        ")");
      TORCH_CHECK_VALUE(i == 0 || p[i] > p[i - 1], kOp,
                        "exclude must be sorted and without duplicates (torch.unique), got exclude[", i - 1,
                        "] = ", p[i - 1], " then ", p[i]);
    }
  }
  TORCH_CHECK_VALUE(k >= 0 && k <= c - exclude.numel(), kOp, "k must be in [0, ", c - exclude.numel(),
                    "] (", c, " classes, ", exclude.numel(), " excluded), got ", k);
}

bool check_class_topk_backend(c10::string_view backend, const at::Tensor& embeddings) {
  TORCH_CHECK_VALUE(backend == "auto" || backend == "chunked" || backend == "cutlass_sm90", kOp,
                    "backend must be one of 'auto', 'chunked', 'cutlass_sm90', got '", backend, "'");
  const bool fused = backend == "cutlass_sm90";
  TORCH_CHECK_VALUE(!fused || embeddings.is_cuda(), kOp,
                    "backend='cutlass_sm90' selects CUDA kernels (compute capability 9.0), but the embeddings are on ",
                    embeddings.device());
  return fused;
}

namespace {

std::tuple<at::Tensor, at::Tensor> class_topk_cpu(const at::Tensor& embeddings, const at::Tensor& weight,
                                                  const at::Tensor& exclude, int64_t k, int64_t class_chunk,
                                                  c10::string_view backend) {
  check_class_topk(embeddings, weight, exclude, k, class_chunk);
  check_class_topk_backend(backend, embeddings);
  return cpu::class_topk(embeddings, weight, exclude, k, class_chunk);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(oclear, m) {
  m.def("class_topk(Tensor embeddings, Tensor weight, Tensor exclude, int k, int class_chunk=0, "
        "str backend=\"auto\") -> "
        "(Tensor scores, Tensor class_ids)",
        {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(oclear, CPU, m) { m.impl("class_topk", &class_topk_cpu); }

}  // namespace oclear

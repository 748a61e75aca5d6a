// The margin-softmax backend choice and the fused CUTLASS sm_90a path (margin_softmax_fused_cuda.cpp),
// called by the CPU and CUDA registrations of the ops.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <string>
#include <tuple>

#include "../cpu/margin_softmax.h"

namespace oclear {

// "auto": the verified kernels of the device (CPU kernels; on CUDA the chunked path). "chunked": ATen GEMM
// per class chunk + epilogue kernels (CUDA), the CPU kernels (CPU). "cutlass_sm90": the fused CUTLASS GEMMs
// (CUDA, compute capability 9.0, a build with 9.0a; bfloat16). Until a GPU run has verified the fused
// kernels, "auto" does not pick them.
enum class MarginBackend { kAuto, kChunked, kCutlassSm90 };

// Parses the op's backend argument; a CUDA-only backend on a CPU tensor is an error naming both.
MarginBackend parse_margin_backend(c10::string_view name, const at::Tensor& embeddings);

#ifdef OCLEAR_WITH_CUDA
// Why the fused kernels cannot take this call (empty: they can): the build, the device, dtypes, layout.
std::string fused_unavailable_reason(const at::Tensor& embeddings, const at::Tensor& weight);

// (lse, target_logit, w_inv); with `stored` not null (store-E mode) also *stored = E' (N x C bf16, leading
// dimension rounded up to 8: a view of that width), after checking it fits in the device's free memory.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward(const at::Tensor& embeddings, const at::Tensor& weight,
                                                             const at::Tensor& labels,
                                                             const cpu::MarginSoftmaxArgs& args,
                                                             at::Tensor* stored = nullptr);

// (grad_embeddings, grad_weight); `stored` defined: the store-E backward (no recompute GEMM).
std::tuple<at::Tensor, at::Tensor> fused_backward(const at::Tensor& grad_lse, const at::Tensor& grad_target,
                                                  const at::Tensor& embeddings, const at::Tensor& weight,
                                                  const at::Tensor& labels, const at::Tensor& lse,
                                                  const at::Tensor& w_inv, const cpu::MarginSoftmaxArgs& args,
                                                  bool need_grad_embeddings, bool need_grad_weight,
                                                  const at::Tensor& stored = at::Tensor());
#endif

}  // namespace oclear

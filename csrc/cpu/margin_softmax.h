// CPU kernels of the fused margin softmax (see margin_softmax.cpp for the algorithm).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include <oclear/margin.h>

namespace oclear::cpu {

// Settings shared by the forward and the backward kernel of one call.
struct MarginSoftmaxArgs {
  int64_t class_start;   // global id of weight row 0 (the shard's first class)
  int64_t ignore_index;  // rows with this label carry no target and (upstream) no gradient
  MarginParams<double> margin;
  int64_t class_chunk = 0;  // classes per chunk; 0 = chosen from N (chunk_classes)
};

// Per-row statistics over the weight rows this call holds:
//   lse[i]    = log sum_c exp(z_ic)   over c in [class_start, class_start + C_local)  (acc dtype)
//   target[i] = z_{i, y_i} if y_i lies in that range, else 0                          (acc dtype)
//   w_inv[c]  = 1 / max(|w_c|, 1e-12)                                                   (acc dtype)
std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_softmax_forward(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
    const MarginSoftmaxArgs& args);

// Gradients of  sum_i grad_lse[i] * lse[i] + grad_target[i] * target[i]  with respect to the
// embeddings (N, D) and this call's weight rows (C_local, D). Either may be skipped (then an
// empty tensor is returned in its place).
std::tuple<at::Tensor, at::Tensor> margin_softmax_backward(
    const at::Tensor& grad_lse, const at::Tensor& grad_target, const at::Tensor& embeddings,
    const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& lse,
    const at::Tensor& weight_inv_norm, const MarginSoftmaxArgs& args, bool need_grad_embeddings,
    bool need_grad_weight);

}  // namespace oclear::cpu

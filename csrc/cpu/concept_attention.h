// CPU kernels of concept attention (see concept_attention.cpp and concept_attention_kernel.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <tuple>

#include "output_cache.h"

namespace oclear::cpu {

// Element strides of a (batch, head, row, Dh) tensor whose last dimension is contiguous.
struct Strides4 {
  int64_t batch, head, row;
};

// One problem: q (B, H, Lq, Dh), k and v (B or 1, H, Lk, Dh), mask (B, Lk) or null.
template <typename scalar_t>
struct AttentionProblem {
  int64_t batch, heads, lq, lk, dh;
  bool kv_broadcast;  // k, v have batch 1: one memory shared by the whole batch
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  Strides4 q_strides, k_strides, v_strides;
  const bool* mask;  // contiguous (B, Lk), true = padding; null = no padding
  double scale;
};

// Backward inputs (contiguous (B, H, Lq, Dh) grad_out and out, (B, H, Lq) lse) and outputs
// (contiguous, null when not needed).
template <typename scalar_t>
struct BackwardIO {
  const scalar_t* grad_out;
  const scalar_t* out;
  const at::opmath_type<scalar_t>* lse;
  scalar_t* grad_q;
  scalar_t* grad_k;
  scalar_t* grad_v;
  // A gradient whose memory is mapped already (a reused block): stored non-temporally.
  bool stream_grad_q, stream_grad_k, stream_grad_v;
};

// Shared with the CUDA glue (csrc/ops/concept_attention.cpp).
// The kernels read rows with a stride but need each row (the Dh axis) contiguous.
inline at::Tensor rows_contiguous(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

// Fresh contiguous gradients shaped like q, k, v (an empty tensor for one not needed); zeroed when q or
// k is empty, where nothing attends or there is nothing to attend to. A (B, H, Lk, Dh) k that happens
// to be expanded from batch 1 still gets a per-batch gradient; autograd of the expand sums it.
// CPU gradients come from the output cache (output_cache.h).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_grads(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, bool need_q, bool need_k,
                                                                  bool need_v) {
  const auto fresh = [](const at::Tensor& t, bool need) {
    if (!need) return t.new_empty({0});
    if (t.is_cpu()) return empty_output(t.sizes(), t.scalar_type());
    return at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
  };
  at::Tensor gq = fresh(q, need_q), gk = fresh(k, need_k), gv = fresh(v, need_v);
  if (q.numel() == 0 || k.numel() == 0) {
    gq.zero_();
    gk.zero_();
    gv.zero_();
  }
  return {gq, gk, gv};
}

// out (B, H, Lq, Dh) contiguous in q's dtype, lse (B, H, Lq) in the accumulation dtype
// (float32, float64 for float64); a query row whose keys are all padding gets out = 0, lse = -inf.
std::tuple<at::Tensor, at::Tensor> concept_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v,
                                                             const std::optional<at::Tensor>& key_padding_mask,
                                                             double scale);

// Gradients of sum(grad_out * out) with respect to q, k, v (k's and v's summed over the batch when
// they broadcast); an output that is not needed is returned as an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> concept_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out, const at::Tensor& lse, double scale,
    bool need_grad_q, bool need_grad_k, bool need_grad_v);

// The instruction set the kernels run with: "avx512", "avx2" or "baseline" (follows torch's CPU
// capability, so ATEN_CPU_CAPABILITY=default|avx2 selects the others, e.g. for tests).
const char* concept_attention_isa();

}  // namespace oclear::cpu

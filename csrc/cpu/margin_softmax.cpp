// CPU margin softmax: class chunks, one GEMM per chunk through at::mm (MKL / oneDNN), fused epilogue.
//
// Forward, per chunk of T classes:  S = x^ (N, D) @ W_chunk^T (D, T)  -> raw dot products,
//   cos = S * w_inv (no normalised copy of W), logits, online softmax into one state per row.
// Backward, per chunk: recompute S, turn it into B = dLoss/dcos * w_inv (epilogue), then
//   dx^ += B @ W_chunk
//   E    = B^T @ x^  (T, D)      = w_inv_c * dLoss/dw^_c
//   dW_c = E_c - w_c * w_inv_c^2 * (w_c . E_c)   (chain rule through w^ = w / |w|)
// Parallelism: the GEMMs use BLAS's own threads; the epilogues run at::parallel_for over rows (the
// projection over classes). The chunks themselves are a serial loop: nesting single-threaded GEMMs
// inside a parallel loop would need BLAS to stay sequential there, which torch's MKL settings
// (dynamic threading off) do not give, while the chunk GEMMs already run on BLAS's threads at the
// bare GEMMs' rate (benchmarks/results/margin_softmax_cpu_float32.json: four chunked GEMMs within
// 1.33x of the three bare ones).
// Memory beyond inputs and outputs: x^ and dx^ (N x D), a chunk of logits (N x T), a converted
// weight chunk and E (T x D); nothing of size N x C.
#include "margin_softmax.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "class_chunks.h"
#include "margin_softmax_epilogue.h"

namespace oclear::cpu {
namespace {

// dW_c = E_c - w_c * w_inv_c^2 * (w_c . E_c), or E_c where |w_c| <= eps (w^ = w / eps there, so
// normalisation contributes no projection: what F.normalize's autograd does).
template <typename acc_t, typename scalar_t>
void project_weight_grad(const acc_t* e, const acc_t* w, const acc_t* w_inv, int64_t t, int64_t d,
                         scalar_t* grad_w) {
  at::parallel_for(0, t, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const acc_t* __restrict er = e + c * d;
      const acc_t* __restrict wr = w + c * d;
      scalar_t* __restrict out = grad_w + c * d;
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t k = 0; k < d; ++k) dot += wr[k] * er[k];
      const bool projected = w_inv[c] * acc_t(kNormEps) < acc_t(1);
      const acc_t coef = projected ? w_inv[c] * w_inv[c] * dot : acc_t(0);
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) out[k] = static_cast<scalar_t>(er[k] - wr[k] * coef);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_softmax_forward(
    const at::Tensor& embeddings, const at::Tensor& weight_in, const at::Tensor& labels_in,
    const MarginSoftmaxArgs& args) {
  const int64_t n = embeddings.size(0);
  const int64_t d = embeddings.size(1);
  const int64_t c_local = weight_in.size(0);
  const at::ScalarType acc = at::toOpMathType(embeddings.scalar_type());
  const auto acc_opts = embeddings.options().dtype(acc);

  at::Tensor lse = at::empty({n}, acc_opts);
  at::Tensor target = at::zeros({n}, acc_opts);
  at::Tensor w_inv = at::empty({c_local}, acc_opts);
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const Normalized xn = normalize_rows(embeddings, acc);
  const int64_t chunk = chunk_classes(n, args.class_chunk);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, embeddings.scalar_type(), "oclear::margin_softmax_forward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const MarginParams<acc_t> p = args.margin.cast<acc_t>();
        std::vector<SoftmaxState<acc_t>> states(n, SoftmaxState<acc_t>::empty());
        acc_t* target_ptr = target.data_ptr<acc_t>();
        acc_t* w_inv_ptr = w_inv.data_ptr<acc_t>();
        const int64_t* label_ptr = labels.data_ptr<int64_t>();
        at::Tensor logits = at::empty({n * std::min(chunk, c_local)}, acc_opts);
        at::Tensor w_buffer = std::is_same_v<scalar_t, acc_t> ? at::Tensor()
                                                              : at::empty({chunk, d}, acc_opts);

        for (int64_t c0 = 0; c0 < c_local; c0 += chunk) {
          const int64_t t = std::min(chunk, c_local - c0);
          const at::Tensor wt = weight_chunk<scalar_t, acc_t>(weight, c0, t, w_buffer);
          inverse_norms(wt.data_ptr<acc_t>(), t, d, w_inv_ptr + c0);
          at::Tensor s = logits.narrow(0, 0, n * t).view({n, t});
          at::mm_out(s, xn.x_hat, wt.t());
          acc_t* s_ptr = s.data_ptr<acc_t>();
          at::parallel_for(0, n, kRowGrain, [&](int64_t i0, int64_t i1) {
            forward_tile(s_ptr + i0 * t, i1 - i0, t, w_inv_ptr + c0, label_ptr + i0,
                         args.class_start + c0, args.ignore_index, p, target_ptr + i0,
                         states.data() + i0);
          });
        }

        acc_t* lse_ptr = lse.data_ptr<acc_t>();
        for (int64_t i = 0; i < n; ++i) lse_ptr[i] = states[i].log_sum_exp();
      });
  return {lse, target, w_inv};
}

std::tuple<at::Tensor, at::Tensor> margin_softmax_backward(
    const at::Tensor& grad_lse_in, const at::Tensor& grad_target_in, const at::Tensor& embeddings,
    const at::Tensor& weight_in, const at::Tensor& labels_in, const at::Tensor& lse_in,
    const at::Tensor& w_inv_in, const MarginSoftmaxArgs& args, bool need_grad_embeddings,
    bool need_grad_weight) {
  const int64_t n = embeddings.size(0);
  const int64_t d = embeddings.size(1);
  const int64_t c_local = weight_in.size(0);
  const at::ScalarType acc = at::toOpMathType(embeddings.scalar_type());
  const auto acc_opts = embeddings.options().dtype(acc);

  at::Tensor grad_weight = need_grad_weight ? at::empty_like(weight_in, at::MemoryFormat::Contiguous)
                                            : at::empty({0}, weight_in.options());
  if (!need_grad_embeddings && !need_grad_weight) {
    return {at::empty({0}, embeddings.options()), grad_weight};
  }
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor w_inv = w_inv_in.contiguous();
  const at::Tensor grad_lse = grad_lse_in.to(acc).contiguous();
  const at::Tensor grad_target = grad_target_in.to(acc).contiguous();
  const Normalized xn = normalize_rows(embeddings, acc);
  const int64_t chunk = chunk_classes(n, args.class_chunk);
  at::Tensor grad_x_hat = need_grad_embeddings ? at::zeros({n, d}, acc_opts) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, embeddings.scalar_type(), "oclear::margin_softmax_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const MarginParams<acc_t> p = args.margin.cast<acc_t>();
        const acc_t* w_inv_ptr = w_inv.data_ptr<acc_t>();
        const acc_t* lse_ptr = lse.data_ptr<acc_t>();
        const acc_t* grad_lse_ptr = grad_lse.data_ptr<acc_t>();
        const acc_t* grad_target_ptr = grad_target.data_ptr<acc_t>();
        const int64_t* label_ptr = labels.data_ptr<int64_t>();
        at::Tensor logits = at::empty({n * std::min(chunk, c_local)}, acc_opts);
        at::Tensor w_buffer = std::is_same_v<scalar_t, acc_t> ? at::Tensor()
                                                              : at::empty({chunk, d}, acc_opts);
        at::Tensor e_buffer = need_grad_weight ? at::empty({chunk, d}, acc_opts) : at::Tensor();

        for (int64_t c0 = 0; c0 < c_local; c0 += chunk) {
          const int64_t t = std::min(chunk, c_local - c0);
          const at::Tensor wt = weight_chunk<scalar_t, acc_t>(weight, c0, t, w_buffer);
          at::Tensor b = logits.narrow(0, 0, n * t).view({n, t});
          at::mm_out(b, xn.x_hat, wt.t());
          acc_t* b_ptr = b.data_ptr<acc_t>();
          at::parallel_for(0, n, kRowGrain, [&](int64_t i0, int64_t i1) {
            backward_tile(b_ptr + i0 * t, i1 - i0, t, w_inv_ptr + c0, label_ptr + i0,
                          args.class_start + c0, args.ignore_index, p, lse_ptr + i0,
                          grad_lse_ptr + i0, grad_target_ptr + i0);
          });
          if (need_grad_embeddings) grad_x_hat.addmm_(b, wt);
          if (need_grad_weight) {
            at::Tensor e = e_buffer.narrow(0, 0, t);
            at::mm_out(e, b.t(), xn.x_hat);
            if (grad_weight.scalar_type() == embeddings.scalar_type()) {
              project_weight_grad(e.data_ptr<acc_t>(), wt.data_ptr<acc_t>(), w_inv_ptr + c0, t, d,
                                  grad_weight.data_ptr<scalar_t>() + c0 * d);
            } else {  // a float32 weight beside 16-bit embeddings: its gradient stays float32
              project_weight_grad(e.data_ptr<acc_t>(), wt.data_ptr<acc_t>(), w_inv_ptr + c0, t, d,
                                  grad_weight.data_ptr<float>() + c0 * d);
            }
          }
        }
      });

  if (!need_grad_embeddings) return {at::empty({0}, embeddings.options()), grad_weight};
  // dx = (g - x^ (x^ . g)) / |x| with g = dLoss/dx^, or g / eps where |x| <= eps (no projection).
  const at::Tensor& g = grad_x_hat;
  const at::Tensor projected = (xn.x_inv * kNormEps < 1.0).unsqueeze(1);
  const at::Tensor radial = (xn.x_hat * g).sum(1, /*keepdim=*/true);
  const at::Tensor grad_x = at::where(projected, g - xn.x_hat * radial, g) * xn.x_inv.unsqueeze(1);
  return {grad_x.to(embeddings.scalar_type()), grad_weight};
}

}  // namespace oclear::cpu

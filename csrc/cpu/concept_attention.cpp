// CPU concept attention: runtime choice of instruction set, tensors in and out.
//
// The tile programs (concept_attention_kernel.h) are compiled three times, for AVX-512, AVX2 + FMA
// and the compiler's baseline, through `#pragma GCC target` regions, because the extension itself
// is built for the baseline (SSE2 on x86-64) like torch's own non-dispatched code; torch's CPU
// capability decides at run time which copy runs. On other architectures only the baseline copy
// exists (the vector code is plain GCC/Clang vector extensions, so NEON etc. get 16-byte vectors).
#include "concept_attention.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <oclear/fast_exp.h>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define OCLEAR_ATTENTION_X86 1
#endif

namespace oclear::cpu {

namespace attention_baseline {
constexpr int64_t kVectorBytes = 16;
#include "concept_attention_kernel.h"
}  // namespace attention_baseline

#ifdef OCLEAR_ATTENTION_X86
// fp-contract: the extension compiles in ISO C++ mode, where GCC does not fuse a * b + c into an FMA
// by itself; the micro-kernel is written as multiply-add on vectors and wants FMAs.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#pragma clang fp contract(fast)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#pragma GCC optimize("fp-contract=fast")
#endif
namespace attention_avx2 {
constexpr int64_t kVectorBytes = 32;
#include "concept_attention_kernel.h"
}  // namespace attention_avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
#pragma GCC optimize("fp-contract=fast")
#endif
namespace attention_avx512 {
constexpr int64_t kVectorBytes = 64;
#include "concept_attention_kernel.h"
}  // namespace attention_avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // OCLEAR_ATTENTION_X86

namespace {

enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa runtime_isa() {
#ifdef OCLEAR_ATTENTION_X86
  static const Isa isa = [] {
    const std::string cap = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512" (ATEN_CPU_CAPABILITY)
    if (cap == "AVX512") return Isa::kAvx512;
    if (cap == "AVX2") return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  return isa;
#else
  return Isa::kBaseline;
#endif
}

Strides4 strides_of(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.stride(3) == 1 || t.size(3) == 1);
  return Strides4{t.stride(0), t.stride(1), t.stride(2)};
}


template <typename scalar_t>
AttentionProblem<scalar_t> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& mask, double scale) {
  AttentionProblem<scalar_t> p;
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.lq = q.size(2);
  p.lk = k.size(2);
  p.dh = q.size(3);
  p.kv_broadcast = k.size(0) == 1 && q.size(0) != 1;
  p.q = q.data_ptr<scalar_t>();
  p.k = k.data_ptr<scalar_t>();
  p.v = v.data_ptr<scalar_t>();
  p.q_strides = strides_of(q);
  p.k_strides = strides_of(k);
  p.v_strides = strides_of(v);
  if (p.kv_broadcast) p.k_strides.batch = p.v_strides.batch = 0;
  p.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  p.scale = scale;
  return p;
}

}  // namespace

const char* concept_attention_isa() {
  switch (runtime_isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

std::tuple<at::Tensor, at::Tensor> concept_attention_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                             const at::Tensor& v_in,
                                                             const std::optional<at::Tensor>& key_padding_mask,
                                                             double scale) {
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  const at::Tensor mask = key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
  const int64_t b = q.size(0), h = q.size(1), lq = q.size(2), dh = q.size(3);
  const at::ScalarType acc = at::toOpMathType(q.scalar_type());
  at::Tensor out = empty_output({b, h, lq, dh}, q.scalar_type());
  at::Tensor lse = empty_output({b, h, lq}, acc);
  if (out.numel() == 0) return {out, lse};
  if (k.size(2) == 0) {  // no keys at all: every row is a row without keys
    out.zero_();
    lse.fill_(-INFINITY);
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "oclear::concept_attention_forward", [&] {
    const AttentionProblem<scalar_t> p = make_problem<scalar_t>(q, k, v, mask, scale);
    // Non-temporal stores pay off on memory that is mapped already (no write-allocate reads of lines
    // about to be overwritten) and hurt on fresh pages, whose lines the kernel has just zeroed into the
    // cache (benchmarks/README.md, the concept-attention CPU kernel notes).
    const bool stream = output_block_reused(out);
    auto* o = out.data_ptr<scalar_t>();
    auto* l = lse.data_ptr<at::opmath_type<scalar_t>>();
    switch (runtime_isa()) {
#ifdef OCLEAR_ATTENTION_X86
      case Isa::kAvx512:
        attention_avx512::forward(p, o, l, stream);
        break;
      case Isa::kAvx2:
        attention_avx2::forward(p, o, l, stream);
        break;
#endif
      default:
        attention_baseline::forward(p, o, l, stream);
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> concept_attention_backward(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out_in, const at::Tensor& lse_in,
    double scale, bool need_grad_q, bool need_grad_k, bool need_grad_v) {
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  const at::Tensor mask = key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
  at::Tensor grad_q, grad_k, grad_v;
  std::tie(grad_q, grad_k, grad_v) = empty_grads(q, k, v, need_grad_q, need_grad_k, need_grad_v);
  if (q.numel() == 0 || k.numel() == 0) return {grad_q, grad_k, grad_v};  // zero gradients
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor out = out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "oclear::concept_attention_backward", [&] {
    const AttentionProblem<scalar_t> p = make_problem<scalar_t>(q, k, v, mask, scale);
    BackwardIO<scalar_t> io;
    io.grad_out = grad_out.data_ptr<scalar_t>();
    io.out = out.data_ptr<scalar_t>();
    io.lse = lse.data_ptr<at::opmath_type<scalar_t>>();
    io.grad_q = need_grad_q ? grad_q.data_ptr<scalar_t>() : nullptr;
    io.grad_k = need_grad_k ? grad_k.data_ptr<scalar_t>() : nullptr;
    io.grad_v = need_grad_v ? grad_v.data_ptr<scalar_t>() : nullptr;
    io.stream_grad_q = output_block_reused(grad_q);
    io.stream_grad_k = output_block_reused(grad_k);
    io.stream_grad_v = output_block_reused(grad_v);
    switch (runtime_isa()) {
#ifdef OCLEAR_ATTENTION_X86
      case Isa::kAvx512:
        attention_avx512::backward(p, io);
        break;
      case Isa::kAvx2:
        attention_avx2::backward(p, io);
        break;
#endif
      default:
        attention_baseline::backward(p, io);
    }
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace oclear::cpu

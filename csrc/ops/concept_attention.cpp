// Torch glue of concept attention: schemas, argument checks, CPU and CUDA registration.
//
//   out = softmax(scale * q k^T, padding keys masked) v      q (B, H, Lq, Dh), k, v (B or 1, H, Lk, Dh)
//
// k and v with batch 1 are one memory shared by the whole batch (never expanded). The forward
// returns the log-sum-exp of each query row (B, H, Lq) in the accumulation dtype instead of the
// attention matrix; the backward recomputes the probabilities from it. A row whose keys are all
// padding has out = 0, lse = -inf and gets no gradient.
//
// `backend` picks the kernel family: an op argument (not an environment variable read per call), so
// torch.compile sees it in the graph and the Python context manager oclear_ext.concept_attention_backend
// only sets the default the wrapper passes.
//   "auto"         the verified kernels: CPU kernels on CPU, CUDA-core kernels on CUDA;
//   "cuda_core"    the CUDA-core kernels (CUDA tensors only);
//   "tensor_core"  the WMMA tensor-core kernels (CUDA, bf16 / fp16, Dh in {16, 32, 64}, Lk <= 256, sm_80+);
//                  opt-in until a GPU run verifies them; where they do not apply the op raises.
// oclear_ext/_ops/concept_attention.py registers the fake kernels and the autograd formula.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "../cpu/concept_attention.h"

#ifdef OCLEAR_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../cuda/concept_attention.cuh"
#endif

namespace oclear {
namespace {

constexpr const char* kOp = "oclear_ext.concept_attention: ";
constexpr int64_t kMaxHeadDim = 256;

enum class Backend { kAuto, kCudaCore, kTensorCore };

// The backend argument, checked against q's device (CPU tensors have one kernel family: "auto").
Backend parse_backend(c10::string_view name, const at::Tensor& q) {
  Backend b;
  if (name == "auto") {
    b = Backend::kAuto;
  } else if (name == "cuda_core") {
    b = Backend::kCudaCore;
  } else if (name == "tensor_core") {
    b = Backend::kTensorCore;
  } else {
    TORCH_CHECK_VALUE(false, kOp, "backend must be one of 'auto', 'cuda_core', 'tensor_core', got '", name, "'");
  }
  TORCH_CHECK_VALUE(b == Backend::kAuto || q.is_cuda(), kOp, "backend='", name,
                    "' selects CUDA kernels, but q is on ", q.device(), " (CPU tensors take backend='auto')");
  return b;
}

void check_attention_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, kOp, name, " must be a 4-D tensor (batch, heads, length, head_dim), got shape ",
                    t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, kOp, name,
                   " must be float32, float64, bfloat16 or float16, got ", dt);
}

// Everything forward and backward check: shapes, dtypes, devices, mask, scale.
void check_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& mask, double scale) {
  check_attention_tensor(q, "q");
  check_attention_tensor(k, "k");
  check_attention_tensor(v, "v");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), kOp,
                   "q, k and v must have the same dtype, got q ", q.scalar_type(), ", k ", k.scalar_type(), ", v ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(q.device() == k.device() && q.device() == v.device(), kOp,
                    "q, k and v must be on one device, got q on ", q.device(), ", k on ", k.device(), ", v on ",
                    v.device());
  const int64_t dh = q.size(3);
  TORCH_CHECK_VALUE(dh >= 1 && dh <= kMaxHeadDim, kOp, "head_dim (q.size(3)) must be in [1, ", kMaxHeadDim,
                    "], got q of shape ", q.sizes());
  TORCH_CHECK_VALUE(k.size(1) == q.size(1) && v.size(1) == q.size(1), kOp,
                    "q, k and v must have the same number of heads (dim 1), got q ", q.sizes(), ", k ", k.sizes(),
                    ", v ", v.sizes());
  TORCH_CHECK_VALUE(k.size(3) == dh && v.size(3) == dh, kOp,
                    "k and v must have q's head_dim (dim 3) = ", dh, ", got k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK_VALUE(k.size(2) == v.size(2), kOp, "k and v must have the same number of keys (dim 2), got k ",
                    k.sizes(), ", v ", v.sizes());
  TORCH_CHECK_VALUE(k.size(0) == v.size(0) && (k.size(0) == q.size(0) || k.size(0) == 1), kOp,
                    "k and v must have q's batch size ", q.size(0),
                    " or batch size 1 (a memory shared by the batch), got k ", k.sizes(), ", v ", v.sizes());
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, kOp, "key_padding_mask must be bool (True = padding), got ",
                     m.scalar_type());
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == k.size(2), kOp,
                      "key_padding_mask must have shape (batch, keys) = (", q.size(0), ", ", k.size(2), "), got ",
                      m.sizes());
    TORCH_CHECK_VALUE(m.device() == q.device(), kOp, "key_padding_mask must be on q's device ", q.device(),
                      ", got ", m.device());
  }
  TORCH_CHECK_VALUE(std::isfinite(scale), kOp, "scale must be a finite number, got ", scale);
}

void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& out, const at::Tensor& lse) {
  const std::vector<int64_t> out_shape{q.size(0), q.size(1), q.size(2), q.size(3)};
  TORCH_CHECK_VALUE(grad_out.sizes() == out_shape && out.sizes() == out_shape, "concept_attention_backward: ",
                    "grad_out and out must have shape ", at::IntArrayRef(out_shape), ", got ", grad_out.sizes(),
                    " and ", out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
                   "concept_attention_backward: grad_out and out must be ", q.scalar_type(), ", got ",
                   grad_out.scalar_type(), " and ", out.scalar_type());
  const at::ScalarType acc = at::toOpMathType(q.scalar_type());
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                        lse.size(2) == q.size(2),
                    "concept_attention_backward: lse must have shape (B, H, Lq) = (", q.size(0), ", ", q.size(1),
                    ", ", q.size(2), "), got ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == acc, "concept_attention_backward: lse must be ", acc, ", got ",
                   lse.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
                    "concept_attention_backward: grad_out, out and lse must be on q's device ", q.device());
  (void)k;
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const std::optional<at::Tensor>& key_padding_mask, double scale,
                                               c10::string_view backend) {
  check_problem(q, k, v, key_padding_mask, scale);
  parse_backend(backend, q);
  return cpu::concept_attention_forward(q, k, v, key_padding_mask, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out, const at::Tensor& lse, double scale,
    bool need_grad_q, bool need_grad_k, bool need_grad_v, c10::string_view backend) {
  check_problem(q, k, v, key_padding_mask, scale);
  check_backward_inputs(grad_out, q, k, out, lse);
  parse_backend(backend, q);
  return cpu::concept_attention_backward(grad_out, q, k, v, key_padding_mask, out, lse, scale, need_grad_q,
                                         need_grad_k, need_grad_v);
}

#ifdef OCLEAR_WITH_CUDA
cuda::AttentionDtype cuda_dtype(at::ScalarType dt) {
  switch (dt) {
    case at::kFloat:
      return cuda::AttentionDtype::kFloat32;
    case at::kBFloat16:
      return cuda::AttentionDtype::kBFloat16;
    case at::kHalf:
      return cuda::AttentionDtype::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, kOp, "on CUDA, q, k and v must be float32, bfloat16 or float16, got ", dt);
  }
  return cuda::AttentionDtype::kFloat32;  // unreachable
}

// Shapes, pointers and strides for the framework-free launchers (last dimension contiguous).
cuda::AttentionArgs cuda_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                              double scale) {
  cuda::AttentionArgs a;
  a.batch = q.size(0);
  a.heads = q.size(1);
  a.lq = q.size(2);
  a.lk = k.size(2);
  a.dh = q.size(3);
  a.kv_broadcast = k.size(0) == 1 && q.size(0) != 1;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  for (int i = 0; i < 3; ++i) {
    a.q_strides[i] = q.stride(i);
    a.k_strides[i] = a.kv_broadcast && i == 0 ? 0 : k.stride(i);
    a.v_strides[i] = a.kv_broadcast && i == 0 ? 0 : v.stride(i);
  }
  a.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  a.scale = static_cast<float>(scale);
  a.dtype = cuda_dtype(q.scalar_type());
  return a;
}

// backend="tensor_core": the WMMA kernels, or an error that names why they do not apply here (never a
// silent fall-back: a user who asks for them is measuring or testing them).
void require_tensor_cores(const cuda::AttentionArgs& a, const at::Tensor& q) {
  const cuda::TcSupport support = cuda::concept_attention_tc_support(a);
  constexpr const char* kTc = "backend='tensor_core' ";
  switch (support) {
    case cuda::TcSupport::kSupported:
      return;
    case cuda::TcSupport::kDtype:
      TORCH_CHECK_TYPE(false, kOp, kTc, "needs bfloat16 or float16 q, k and v, got ", q.scalar_type(),
                       " (the CUDA-core kernels, backend='auto', take float32)");
    case cuda::TcSupport::kHeadDim:
      TORCH_CHECK_VALUE(false, kOp, kTc, "needs head_dim (q.size(3)) in {16, 32, 64}, got ", a.dh);
    case cuda::TcSupport::kKeyCount:
      TORCH_CHECK_VALUE(false, kOp, kTc, "keeps whole key rows in shared memory: it needs 1 <= keys (k.size(2)) <= 256, got ",
                        a.lk);
    case cuda::TcSupport::kSharedMemory:
      TORCH_CHECK_VALUE(false, kOp, kTc, "keeps whole key rows in shared memory: ", a.lk, " keys at head_dim ", a.dh,
                        " do not fit the per-block shared memory of ", q.device());
    case cuda::TcSupport::kArchitecture: {
      int major = 0, minor = 0;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.device().index()));
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.device().index()));
      TORCH_CHECK(false, kOp, kTc, "needs a GPU of compute capability 8.0 or newer and a build with sm_80+ code for it; ",
                  q.device(), " is sm_", major, minor);
    }
    case cuda::TcSupport::kDeviceQuery:
      break;
  }
  TORCH_CHECK(false, kOp, kTc, "could not query ", q.device(), "'s attributes (shared memory, compute capability)");
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                                const std::optional<at::Tensor>& key_padding_mask, double scale,
                                                c10::string_view backend_name) {
  check_problem(q_in, k_in, v_in, key_padding_mask, scale);
  const Backend backend = parse_backend(backend_name, q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = cpu::rows_contiguous(q_in), k = cpu::rows_contiguous(k_in);
  const at::Tensor v = cpu::rows_contiguous(v_in);
  const at::Tensor mask = key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
  cuda::AttentionArgs a = cuda_args(q, k, v, mask, scale);
  at::Tensor out = at::empty({a.batch, a.heads, a.lq, a.dh}, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({a.batch, a.heads, a.lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (a.lk == 0) {
    out.zero_();
    lse.fill_(-INFINITY);
    return {out, lse};
  }
  // Checked where a kernel runs: an empty problem launches none, whatever the backend.
  if (backend == Backend::kTensorCore) require_tensor_cores(a, q);
  a.tensor_cores = backend == Backend::kTensorCore;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  C10_CUDA_CHECK(cuda::concept_attention_forward(a, out.data_ptr(), lse.data_ptr<float>(), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out_in, const at::Tensor& lse_in,
    double scale, bool need_grad_q, bool need_grad_k, bool need_grad_v, c10::string_view backend_name) {
  check_problem(q_in, k_in, v_in, key_padding_mask, scale);
  check_backward_inputs(grad_out_in, q_in, k_in, out_in, lse_in);
  const Backend backend = parse_backend(backend_name, q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = cpu::rows_contiguous(q_in), k = cpu::rows_contiguous(k_in);
  const at::Tensor v = cpu::rows_contiguous(v_in);
  const at::Tensor mask = key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
  cuda::AttentionArgs a = cuda_args(q, k, v, mask, scale);
  at::Tensor grad_q, grad_k, grad_v;
  std::tie(grad_q, grad_k, grad_v) = cpu::empty_grads(q, k, v, need_grad_q, need_grad_k, need_grad_v);
  if (q.numel() == 0 || k.numel() == 0) return {grad_q, grad_k, grad_v};  // zero gradients
  if (backend == Backend::kTensorCore) require_tensor_cores(a, q);
  a.tensor_cores = backend == Backend::kTensorCore;
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor out = out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor delta = at::empty({a.batch, a.heads, a.lq}, f32);
  // A shared memory's dK, dV are sums over the batch: float32 accumulators (H, Lk, Dh), added to
  // atomically once per block of batch elements, then cast. Per-batch keys need none.
  at::Tensor acc_k = a.kv_broadcast && need_grad_k ? at::zeros({a.heads, a.lk, a.dh}, f32) : at::Tensor();
  at::Tensor acc_v = a.kv_broadcast && need_grad_v ? at::zeros({a.heads, a.lk, a.dh}, f32) : at::Tensor();
  cuda::AttentionGrads g;
  g.grad_out = grad_out.data_ptr();
  g.out = out.data_ptr();
  g.lse = lse.data_ptr<float>();
  g.delta = delta.data_ptr<float>();
  g.grad_q = need_grad_q ? grad_q.data_ptr() : nullptr;
  g.grad_k = need_grad_k ? grad_k.data_ptr() : nullptr;
  g.grad_v = need_grad_v ? grad_v.data_ptr() : nullptr;
  g.acc_k = acc_k.defined() ? acc_k.data_ptr<float>() : nullptr;
  g.acc_v = acc_v.defined() ? acc_v.data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  C10_CUDA_CHECK(cuda::concept_attention_backward(a, g, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_q, grad_k, grad_v};
}
#endif  // OCLEAR_WITH_CUDA

std::string cpu_isa() { return cpu::concept_attention_isa(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(oclear, m) {
  m.def("concept_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float scale, "
        "str backend=\"auto\") -> (Tensor out, Tensor lse)",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "concept_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, "
      "Tensor out, Tensor lse, float scale, bool need_grad_q, bool need_grad_k, bool need_grad_v, "
      "str backend=\"auto\") -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)",
      {at::Tag::pt2_compliant_tag});
  // Introspection (leading underscore: not API): which CPU instruction set the kernels use, for
  // benchmarks and the tests of every code path.
  m.def("_concept_attention_cpu_isa() -> str", &cpu_isa);
}

TORCH_LIBRARY_IMPL(oclear, CPU, m) {
  m.impl("concept_attention_forward", &forward_cpu);
  m.impl("concept_attention_backward", &backward_cpu);
}

#ifdef OCLEAR_WITH_CUDA
TORCH_LIBRARY_IMPL(oclear, CUDA, m) {
  m.impl("concept_attention_forward", &forward_cuda);
  m.impl("concept_attention_backward", &backward_cuda);
}
#endif

}  // namespace oclear

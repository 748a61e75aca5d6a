"""Python side of concept attention: fake kernels, autograd, autocast, the kernel-family switch, the public op.

The C++ op `oclear::concept_attention_forward` returns the output and the log-sum-exp of each query
row (B, H, Lq), in the accumulation dtype (float32; float64 for float64), not the attention matrix;
`oclear::concept_attention_backward` recomputes the probabilities from it (docs/design.md#concept-attention).

Kernel family: both ops take `backend` ("auto", "cuda_core" or "tensor_core") as an argument, so
torch.compile sees the choice in the graph; :func:`concept_attention_backend` (a context manager in the
style of torch.nn.attention.sdpa_kernel) sets the default that :func:`concept_attention` passes.

Autocast: under torch.autocast(device, dtype) q, k and v are cast to the autocast dtype, as
scaled_dot_product_attention's rule does (float64 is left alone, as autocast leaves it); the output is
in that dtype, the log-sum-exp float32, and each input's gradient comes back in its own dtype through
the cast's backward.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from numbers import Real

import torch
from torch import Tensor

OP_NAME = "oclear_ext.concept_attention"
MAX_HEAD_DIM = 256
BACKENDS = ("auto", "cuda_core", "tensor_core")
# The tensor-core kernels' static limits (csrc/cuda/concept_attention_tc.cu); the C++ glue also checks the
# device (sm_80+, shared memory per block), which a fake kernel cannot see.
TENSOR_CORE_DTYPES = (torch.bfloat16, torch.float16)
TENSOR_CORE_HEAD_DIMS = (16, 32, 64)
TENSOR_CORE_MAX_KEYS = 256

# The default backend of concept_attention(); process-wide, like sdpa_kernel's flags. A module global
# (not a thread-local) so that torch.compile reads it while tracing and guards on it: a compiled
# function called under another backend recompiles instead of running the old choice.
_default_backend = "auto"


def _check_backend_name(backend: object) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{OP_NAME}: backend must be one of {', '.join(repr(b) for b in BACKENDS)}, got {backend!r}")
    return backend


@contextlib.contextmanager
def concept_attention_backend(backend: str) -> Iterator[None]:
    """Within the block, oclear_ext.concept_attention (and the modules on it) run the kernel family `backend`:

    - ``"auto"`` (the default outside any block): the verified kernels, i.e. the CPU kernels on CPU and
      the CUDA-core kernels on CUDA;
    - ``"cuda_core"``: the CUDA-core kernels (CUDA tensors only);
    - ``"tensor_core"``: the WMMA tensor-core kernels (CUDA, bfloat16 / float16, head_dim in {16, 32, 64},
      at most 256 keys, sm_80+). They have not run on a GPU yet, hence opt-in. Where they do not apply the
      op raises, naming why; it never falls back silently.

    A call that passes ``backend=`` itself is not affected. Blocks nest; the previous default comes back
    on exit, also on an exception. Works inside torch.compile(fullgraph=True) regions, and a compiled
    function called under a different backend is recompiled.
    """
    global _default_backend
    _check_backend_name(backend)
    previous = _default_backend
    _default_backend = backend
    try:
        yield
    finally:
        _default_backend = previous


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_backend(backend: str, q: Tensor, k: Tensor) -> None:
    """The backend rules that do not need the device's properties (the C++ glue checks those too)."""
    _check_backend_name(backend)
    if backend == "auto":
        return
    if q.device.type != "cuda":
        raise ValueError(f"{OP_NAME}: backend='{backend}' selects CUDA kernels, but q is on {q.device} "
                         "(CPU tensors take backend='auto')")
    if backend == "tensor_core":
        if q.dtype not in TENSOR_CORE_DTYPES:
            raise TypeError(f"{OP_NAME}: backend='tensor_core' needs bfloat16 or float16 q, k and v, got {q.dtype}")
        if q.dim() == 4 and q.shape[3] not in TENSOR_CORE_HEAD_DIMS:
            raise ValueError(f"{OP_NAME}: backend='tensor_core' needs head_dim (q.size(3)) in {{16, 32, 64}}, "
                             f"got {q.shape[3]}")


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> None:
    """The shape and device rules of the C++ glue, for the fake (meta) kernels."""
    if len({q.device, k.device, v.device}) > 1:
        raise ValueError(f"{OP_NAME}: q, k and v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}")
    if key_padding_mask is not None and key_padding_mask.device != q.device:
        raise ValueError(f"{OP_NAME}: key_padding_mask must be on q's device {q.device}, got {key_padding_mask.device}")
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: f"{OP_NAME}: q, k and v must be 4-D")
    torch._check(k.shape[1] == q.shape[1] and v.shape[1] == q.shape[1], lambda: f"{OP_NAME}: q, k, v differ in heads")
    torch._check(k.shape[3] == q.shape[3] and v.shape[3] == q.shape[3], lambda: f"{OP_NAME}: q, k, v differ in head_dim")
    torch._check(k.shape[2] == v.shape[2], lambda: f"{OP_NAME}: k and v differ in the number of keys")
    if key_padding_mask is not None:
        torch._check(key_padding_mask.dim() == 2, lambda: f"{OP_NAME}: key_padding_mask must be 2-D")


@torch.library.register_fake("oclear::concept_attention_forward")
def _forward_fake(q, k, v, key_padding_mask, scale, backend="auto"):
    _check_shapes(q, k, v, key_padding_mask)
    _check_backend(backend, q, k)
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:3], dtype=_accumulation_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("oclear::concept_attention_backward")
def _backward_fake(grad_out, q, k, v, key_padding_mask, out, lse, scale, need_grad_q, need_grad_k, need_grad_v,
                   backend="auto"):
    _check_backend(backend, q, k)
    grad_q = q.new_empty(q.shape) if need_grad_q else q.new_empty(0)
    grad_k = k.new_empty(k.shape) if need_grad_k else k.new_empty(0)
    grad_v = v.new_empty(v.shape) if need_grad_v else v.new_empty(0)
    return grad_q, grad_k, grad_v


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, key_padding_mask, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
    ctx.scale = scale
    ctx.backend = backend  # the backward runs the forward's kernel family
    # The log-sum-exp is a by-product for the backward, not a differentiable output.
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    if grad_out is None or not (need_q or need_k or need_v):
        return None, None, None, None, None, None
    grad_q, grad_k, grad_v = torch.ops.oclear.concept_attention_backward(
        grad_out, q, k, v, key_padding_mask, out, lse, ctx.scale, need_q, need_k, need_v, ctx.backend
    )
    return (grad_q if need_q else None, grad_k if need_k else None, grad_v if need_v else None, None, None, None)


torch.library.register_autograd("oclear::concept_attention_forward", _backward, setup_context=_setup_context)


def _autocast_cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    # autocast's "lower precision" rule (scaled_dot_product_attention's): every floating tensor but float64.
    return t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t


def _register_autocast() -> None:
    """Autocast kernels of the forward op, CPU and CUDA: q, k, v in the autocast dtype, then the op with
    autocast off. At the dispatcher, so direct torch.ops.oclear calls, the public function and
    torch.compile all get it. The backward op needs none: it receives the forward's (cast) tensors."""
    forward = torch.ops.oclear.concept_attention_forward.default
    for device_type, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
        def kernel(q, k, v, key_padding_mask, scale, backend="auto", device_type=device_type):
            dtype = torch.get_autocast_dtype(device_type)
            q, k, v = (_autocast_cast(t, dtype) for t in (q, k, v))
            with torch.autocast(device_type, enabled=False):
                return forward(q, k, v, key_padding_mask, scale, backend)

        torch.library.impl("oclear::concept_attention_forward", key)(kernel)


_register_autocast()


def concept_attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None, scale: float | None = None,
    *, backend: str | None = None,
) -> Tensor:
    """Small cross-attention with an optional memory shared by the batch, fused (no attention matrix kept).

        out = softmax(scale * q k^T, padding keys masked) v

    Args:
        q: (B, H, Lq, Dh) queries; float32, float64 (CPU), bfloat16 or float16; 1 <= Dh <= 256.
        k: (B, H, Lk, Dh) keys, or (1, H, Lk, Dh): one memory shared by the whole batch, never expanded
            (its gradient is summed over the batch).
        v: values, the shape of k.
        key_padding_mask: (B, Lk) bool, True marks a padding key (nn.MultiheadAttention's convention),
            or None. A query row whose keys are all padding returns zeros and gets zero gradient.
        scale: the score scale, default 1 / sqrt(Dh).
        backend: the kernel family, "auto", "cuda_core" or "tensor_core" (see concept_attention_backend);
            None takes the default set by concept_attention_backend ("auto" outside any block).

    Returns:
        (B, H, Lq, Dh) in q's dtype (16-bit inputs accumulate in float32), or in the autocast dtype under
        torch.autocast. Any strides with a contiguous last dimension are read in place (e.g. heads split
        by a view of (B, L, H, Dh)).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{OP_NAME}: {name} must be a Tensor, got {type(t).__name__}")
    if key_padding_mask is not None and not isinstance(key_padding_mask, Tensor):
        raise TypeError(f"{OP_NAME}: key_padding_mask must be a bool Tensor or None, got {type(key_padding_mask).__name__}")
    if scale is None:
        if q.dim() != 4:
            raise ValueError(f"{OP_NAME}: q must be a 4-D tensor (batch, heads, length, head_dim), got shape {tuple(q.shape)}")
        scale = 1.0 / math.sqrt(max(q.shape[3], 1))
    elif not isinstance(scale, Real) or isinstance(scale, bool):
        raise TypeError(f"{OP_NAME}: scale must be a real number or None, got {scale!r}")
    backend = _check_backend_name(_default_backend if backend is None else backend)
    out, _ = torch.ops.oclear.concept_attention_forward(q, k, v, key_padding_mask, float(scale), backend)
    return out

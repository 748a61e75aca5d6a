"""Python side of concept attention: fake kernels, autograd, the public op.

The C++ op `oclear::concept_attention_forward` returns the output and the log-sum-exp of each query
row (B, H, Lq), in the accumulation dtype (float32; float64 for float64), not the attention matrix;
`oclear::concept_attention_backward` recomputes the probabilities from it (DESIGN section 4.2).
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

OP_NAME = "oclear_ext.concept_attention"
MAX_HEAD_DIM = 256


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
def _forward_fake(q, k, v, key_padding_mask, scale):
    _check_shapes(q, k, v, key_padding_mask)
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:3], dtype=_accumulation_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("oclear::concept_attention_backward")
def _backward_fake(grad_out, q, k, v, key_padding_mask, out, lse, scale, need_grad_q, need_grad_k, need_grad_v):
    grad_q = q.new_empty(q.shape) if need_grad_q else q.new_empty(0)
    grad_k = k.new_empty(k.shape) if need_grad_k else k.new_empty(0)
    grad_v = v.new_empty(v.shape) if need_grad_v else v.new_empty(0)
    return grad_q, grad_k, grad_v


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, key_padding_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
    ctx.scale = scale
    # The log-sum-exp is a by-product for the backward, not a differentiable output.
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    if grad_out is None or not (need_q or need_k or need_v):
        return None, None, None, None, None
    grad_q, grad_k, grad_v = torch.ops.oclear.concept_attention_backward(
        grad_out, q, k, v, key_padding_mask, out, lse, ctx.scale, need_q, need_k, need_v
    )
    return (grad_q if need_q else None, grad_k if need_k else None, grad_v if need_v else None, None, None)


torch.library.register_autograd("oclear::concept_attention_forward", _backward, setup_context=_setup_context)


def concept_attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None, scale: float | None = None
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

    Returns:
        (B, H, Lq, Dh) in q's dtype (16-bit inputs accumulate in float32). Any strides with a contiguous
        last dimension are read in place (e.g. heads split by a view of (B, L, H, Dh)).
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
    out, _ = torch.ops.oclear.concept_attention_forward(q, k, v, key_padding_mask, float(scale))
    return out

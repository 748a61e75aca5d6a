"""Shared inputs for the concept attention tests."""

from __future__ import annotations

import torch


def make_attention_inputs(
    b: int, h: int, lq: int, lk: int, dh: int, *, broadcast: bool = False, pad_fraction: float = 0.0,
    empty_rows: int = 0, dtype: torch.dtype = torch.float64, seed: int = 0, device: str = "cpu",
):
    """q (B, H, Lq, Dh), k, v (1 or B, H, Lk, Dh), mask (B, Lk) or None; the first `empty_rows` batch
    elements have every key padded."""
    g = torch.Generator().manual_seed(seed)
    kb = 1 if broadcast else b
    q = torch.randn(b, h, lq, dh, generator=g, dtype=torch.float64)
    k = torch.randn(kb, h, lk, dh, generator=g, dtype=torch.float64)
    v = torch.randn(kb, h, lk, dh, generator=g, dtype=torch.float64)
    mask = None
    if pad_fraction > 0 or empty_rows > 0:
        mask = torch.rand(b, lk, generator=g) < pad_fraction
        mask[:empty_rows] = True
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), None if mask is None else mask.to(device)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def output_and_grads(fn, q, k, v, mask, grad_out, **kwargs):
    """fn's output and the gradients of sum(out * grad_out) with respect to q, k, v."""
    ql, kl, vl = leaves(q, k, v)
    out = fn(ql, kl, vl, mask, **kwargs)
    out.backward(grad_out)
    return out.detach(), ql.grad, kl.grad, vl.grad

"""Plain-PyTorch margin softmax (CosFace / ArcFace / SphereFace combined), materialising N x C logits.

Same signature and conventions as oclear_ext.margin_softmax_loss (docs/design.md#margin-softmax):
- cos = clamp(x^ . w^, -1, 1), where the clamp only guards acos's domain: the gradient passes through it;
- target logit s * psi(cos) with psi(c) = cos(m1 acos(c) + m2) - m3, continued past m1 theta + m2 = pi
  by the line of slope 1 through (c*, -1 - m3);
- "exact" margin gradient m1 sin(m1 theta + m2) / max(sin theta, 1e-4) (m1^2, its limit, at theta -> 0
  when m2 = 0), or "straight_through" (1);
- negatives with cos > interclass_filter count as cos = 0, without gradient;
- "mean" over non-ignored rows, 0 when there are none.
Computes in the input dtype, as a plain PyTorch user would.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SIN_THETA_FLOOR = 1e-4


def _is_additive(m1: float, m2: float) -> bool:
    return m1 == 1.0 and m2 == 0.0


def target_cos(c: Tensor, m1: float, m2: float, m3: float) -> Tensor:
    """psi(c): the margin-transformed target cosine, c in [-1, 1]."""
    if _is_additive(m1, m2):
        return c - m3
    boundary = math.cos((math.pi - m2) / m1)
    arc = torch.cos(m1 * torch.acos(c) + m2) - m3
    line = (c - boundary) - 1.0 - m3
    return torch.where(c < boundary, line, arc)


def target_cos_grad(c: Tensor, m1: float, m2: float) -> Tensor:
    """d psi / d c with sin(theta) floored at SIN_THETA_FLOOR."""
    if _is_additive(m1, m2):
        return torch.ones_like(c)
    boundary = math.cos((math.pi - m2) / m1)
    sin_theta = ((1 - c) * (1 + c)).clamp_min(0).sqrt()
    arc = m1 * torch.sin(m1 * torch.acos(c) + m2) / sin_theta.clamp_min(SIN_THETA_FLOOR)
    if m2 == 0.0:  # m1 sin(m1 theta) / sin(theta) -> m1^2 as theta -> 0: a finite limit, not the floor
        arc = torch.where((sin_theta < SIN_THETA_FLOOR) & (c > 0), torch.full_like(c, m1 * m1), arc)
    return torch.where(c < boundary, torch.ones_like(c), arc)


class _ExactTargetMargin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c: Tensor, m1: float, m2: float, m3: float) -> Tensor:
        ctx.save_for_backward(c)
        ctx.m = (m1, m2)
        return target_cos(c, m1, m2, m3)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (c,) = ctx.saved_tensors
        return grad * target_cos_grad(c, *ctx.m), None, None, None


def margin_softmax_loss(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float = 64.0,
    margin: tuple[float, float, float] = (1.0, 0.0, 0.4),
    arcface_grad: str = "exact",
    interclass_filter: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Reference margin softmax loss; see oclear_ext.margin_softmax_loss for the arguments."""
    m1, m2, m3 = (float(m) for m in margin)
    if arcface_grad not in ("exact", "straight_through"):
        raise ValueError(f"arcface_grad must be 'exact' or 'straight_through', got {arcface_grad!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")

    cos = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).t()  # (N, C)
    cos = cos + (cos.clamp(-1, 1) - cos).detach()
    logits = scale * cos
    if interclass_filter is not None:
        logits = torch.where(cos > interclass_filter, torch.zeros_like(logits), logits)

    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)
    cos_target = cos.gather(1, safe_labels).squeeze(1)
    if arcface_grad == "exact":
        psi = _ExactTargetMargin.apply(cos_target, m1, m2, m3)
    else:
        psi = cos_target + (target_cos(cos_target, m1, m2, m3) - cos_target).detach()
    target_logit = scale * psi
    logits = logits.scatter(1, safe_labels, target_logit.unsqueeze(1))

    per_row = torch.logsumexp(logits, dim=1) - target_logit
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / valid.sum().clamp_min(1).to(per_row.dtype)

"""Composed (hybrid-modality) queries: a reference image plus a short modifier text ("medium-dark skin tone").

After Zhao et al., "Progressive Learning for Image Retrieval with Hybrid-Modality Queries" (SIGIR 2022,
arXiv 2204.11212): the query embedding mixes an image part and a text part with a weight predicted per
query, because how much each modality says about the target differs from query to query. What this module
computes, for the query head's image vector v (B, D) and the modifier's tokens T (B, L, D):

    c     = Attn(v, T, T, modifier mask)          the image reads the modifier (the concept attention op)
    i     = normalize(v)                          image part (exactly today's image-only query)
    p     = normalize(P mean(T))                  the modifier on its own (pooled, image-free)
    t     = normalize(i + p + normalize(W c))     text part: the reference moved by the modifier, directly
                                                  and as this image reads it
    alpha = sigmoid(a . [i, t, i * t] + b)        adaptive weight of the image part, per query, in (0, 1)
    q     = normalize(alpha * i + (1 - alpha) * t)

The text part is a residual on the image: the target is the reference with one attribute changed, so a
text part made of the modifier's tokens alone cannot carry the reference's identity (the first version,
t = normalize(W c), did no better than the fixed sum below on the validation split;
benchmarks/results/composed_validation_cpu.json).

The fixed-weight and single-modality variants (`mode`) are the baselines: "sum" is
normalize(i + p) with p = normalize(P mean(T)), the modifier pooled without the image (a fixed 50/50
sum of an image-only and a text-only query), "text" is p alone and "image" is i alone (the modifier is
ignored).

The self-supervised signal for alpha (`weight_targets`) comes from the classification loss itself: the part
whose own embedding classifies the query's target better (lower per-row loss, computed without gradient)
should weigh more, alpha* = sigmoid((loss(t) - loss(i)) / temperature), and alpha is pulled towards alpha*
by a binary cross-entropy next to the main loss. This is our reading of 2204.11212's self-supervised
adaptive weighting (the paper derives the pseudo weight from how well each single-modality query matches
the target); the mixing and the main loss still train alpha end to end.

A row whose modifier is None (or has no words) is the image-only query normalize(v) bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .concept_attention import ConceptAttention

MODES = ("adaptive", "sum", "text", "image")


class QueryComposer(nn.Module):
    """Composes image query vectors (B, D) with modifier tokens (B, L, D) into query embeddings (B, D).

    Args:
        dim: D, divisible by num_heads.
        num_heads: heads of the image-to-modifier attention.
        mode: "adaptive" (the composed model), "sum", "text" or "image" (baselines, see the module docstring).
    """

    def __init__(self, dim: int, num_heads: int = 4, mode: str = "adaptive") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"QueryComposer: mode must be one of {MODES}, got {mode!r}")
        self.dim = dim
        self.mode = mode
        # No output bias: the read of a modifier is a function of its tokens only (no constant direction).
        self.image_to_modifier = ConceptAttention(dim, num_heads, out_bias=False)
        self.read_projection = nn.Linear(dim, dim, bias=False)   # W
        self.pool_projection = nn.Linear(dim, dim, bias=False)   # P (the image-free text query)
        self.weight = nn.Linear(3 * dim, 1)                       # a, b
        # alpha starts at 1/2: a fresh model weighs both parts alike and training moves it per query.
        nn.init.zeros_(self.weight.weight)
        nn.init.zeros_(self.weight.bias)

    def forward(self, image_vec: Tensor, tokens: Tensor, padding: Tensor, *, return_parts: bool = False
                ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """image_vec (B, D) (before normalisation), tokens (B, L, D), padding (B, L) bool (True = padding) ->
        query embeddings (B, D), L2-normalised. With return_parts, also {"image": i, "text": the text part
        (t or p, by mode), "alpha": (B,) (adaptive mode; 1 where a row has no modifier words)}."""
        self._check(image_vec, tokens, padding)
        has_words = ~padding.all(dim=1)
        i = F.normalize(image_vec, dim=1)
        parts: dict[str, Tensor] = {"image": i}
        if self.mode == "image":
            q = i
        elif self.mode == "adaptive":
            c = self.image_to_modifier(image_vec.unsqueeze(1), tokens, tokens, padding).squeeze(1)
            t = F.normalize(i + self._pooled(tokens, padding) + F.normalize(self.read_projection(c), dim=1), dim=1)
            alpha = torch.sigmoid(self.weight(torch.cat([i, t, i * t], dim=1))).squeeze(1)
            alpha = torch.where(has_words, alpha, torch.ones_like(alpha))
            q = F.normalize(alpha[:, None] * i + (1 - alpha[:, None]) * t, dim=1)
            parts.update(text=t, alpha=alpha)
        else:
            p = self._pooled(tokens, padding)
            q = p if self.mode == "text" else F.normalize(i + p, dim=1)
            parts.update(text=p)
        # A row without modifier words is the image-only query exactly (torch.where picks i's own bits).
        q = torch.where(has_words[:, None], q, i)
        return (q, parts) if return_parts else q

    def _pooled(self, tokens: Tensor, padding: Tensor) -> Tensor:
        """p = normalize(P mean(T)) over the modifier's words: (B, L, D), (B, L) -> (B, D)."""
        keep = (~padding).to(tokens.dtype).unsqueeze(2)  # (B, L, 1)
        pooled = (tokens * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)
        return F.normalize(self.pool_projection(pooled), dim=1)

    def _check(self, image_vec: Tensor, tokens: Tensor, padding: Tensor) -> None:
        if image_vec.dim() != 2 or image_vec.shape[1] != self.dim:
            raise ValueError(f"QueryComposer: image_vec must have shape (B, {self.dim}), got {tuple(image_vec.shape)}")
        if tokens.dim() != 3 or tokens.shape[0] != image_vec.shape[0] or tokens.shape[2] != self.dim:
            raise ValueError(f"QueryComposer: tokens must have shape (B, L, {self.dim}) with B = {image_vec.shape[0]}, "
                             f"got {tuple(tokens.shape)}")
        if padding.dtype != torch.bool or tuple(padding.shape) != tuple(tokens.shape[:2]):
            raise ValueError(f"QueryComposer: padding must be bool of shape {tuple(tokens.shape[:2])}, "
                             f"got {padding.dtype} {tuple(padding.shape)}")


def weight_targets(image_loss: Tensor, text_loss: Tensor, temperature: float = 1.0) -> Tensor:
    """alpha* (B,): the self-supervised target of the image part's weight, from per-row classification
    losses (B,) of the image part and the text part alone: sigmoid((text_loss - image_loss) / temperature).
    The part that classifies the target better (lower loss) gets the larger weight; no gradient flows."""
    if temperature <= 0:
        raise ValueError(f"weight_targets: temperature must be > 0, got {temperature}")
    if image_loss.shape != text_loss.shape or image_loss.dim() != 1:
        raise ValueError(f"weight_targets: losses must be two (B,) tensors, got {tuple(image_loss.shape)} and "
                         f"{tuple(text_loss.shape)}")
    return torch.sigmoid((text_loss.detach() - image_loss.detach()) / temperature)


def weight_loss(alpha: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy of the predicted weights alpha (B,) in (0, 1) against alpha* (B,), meaned."""
    return F.binary_cross_entropy(alpha.float(), target.float())

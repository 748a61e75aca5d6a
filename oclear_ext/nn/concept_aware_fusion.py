"""Concept-aware fusion of a document's image and text (docs/design.md#model, OCLEAR / Mixer).

    grounded = LayerNorm(t + Attn(t, M, M))             text tokens read the concept memory M (K x D),
                                                        shared by the batch (broadcast, never expanded)
    c        = Attn(v, grounded, grounded, text mask)   the image attends over its concept-grounded text
    g        = sigmoid(w . [v, W c] + b)                 a learned gate per document
    doc      = normalize(v + g * W c)

The text is less informative than the image and must not drown it: the gate decides how much of the
text context joins. A document without text (all tokens padding) gets c = 0 exactly (the op returns
zeros for a query without keys, and neither the image attention's output projection nor W has a
bias), so its embedding is normalize(v), bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .concept_attention import ConceptAttention


class ConceptAwareFusion(nn.Module):
    """Fuses image embeddings (B, D) with text tokens (B, L, D) into document embeddings (B, D).

    Args:
        dim: D, divisible by num_heads.
        num_concepts: K, the size of the learnable concept memory.
        num_heads: heads of both attentions.
        dropout: dropout on the text context W c (training only).
    """

    def __init__(self, dim: int, num_concepts: int = 256, num_heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        if num_concepts <= 0:
            raise ValueError(f"ConceptAwareFusion: num_concepts must be >= 1, got {num_concepts}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ConceptAwareFusion: dropout must be in [0, 1), got {dropout}")
        self.dim = dim
        self.concepts = nn.Parameter(torch.randn(num_concepts, dim) * dim**-0.5)
        self.text_to_concepts = ConceptAttention(dim, num_heads)
        self.text_norm = nn.LayerNorm(dim)
        # No output bias: a document without text must get exactly zero context.
        self.image_to_text = ConceptAttention(dim, num_heads, out_bias=False)
        self.context = nn.Linear(dim, dim, bias=False)  # W
        self.gate = nn.Linear(2 * dim, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, image_emb: Tensor, text_tokens: Tensor, text_padding_mask: Tensor | None = None, *, return_gate: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """image_emb (B, D), text_tokens (B, L, D), text_padding_mask (B, L) bool (True = padding) ->
        doc_emb (B, D), L2-normalised; with return_gate, also the gate values g (B,)."""
        doc, g = self.mix(image_emb, self.read_text(image_emb, text_tokens, text_padding_mask))
        return (doc, g) if return_gate else doc

    def read_text(self, image_emb: Tensor, text_tokens: Tensor, text_padding_mask: Tensor | None = None) -> Tensor:
        """c (B, D): what the image reads from its concept-grounded text; exactly 0 for a document without text."""
        if image_emb.dim() != 2 or image_emb.shape[1] != self.dim:
            raise ValueError(f"ConceptAwareFusion: image_emb must have shape (B, {self.dim}), got {tuple(image_emb.shape)}")
        if text_tokens.dim() != 3 or text_tokens.shape[0] != image_emb.shape[0] or text_tokens.shape[2] != self.dim:
            raise ValueError(
                f"ConceptAwareFusion: text_tokens must have shape (B, L, {self.dim}) with B = {image_emb.shape[0]}, "
                f"got {tuple(text_tokens.shape)}"
            )
        if text_padding_mask is not None and (
            text_padding_mask.dtype != torch.bool or tuple(text_padding_mask.shape) != tuple(text_tokens.shape[:2])
        ):
            raise ValueError(
                f"ConceptAwareFusion: text_padding_mask must be bool of shape {tuple(text_tokens.shape[:2])}, "
                f"got {text_padding_mask.dtype} {tuple(text_padding_mask.shape)}"
            )
        memory = self.concepts.unsqueeze(0)  # (1, K, D): one memory for the whole batch
        grounded = self.text_norm(text_tokens + self.text_to_concepts(text_tokens, memory, memory))
        return self.image_to_text(image_emb.unsqueeze(1), grounded, grounded, text_padding_mask).squeeze(1)

    def mix(self, image_emb: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """(normalize(v + g * W c) (B, D), gate g (B,)) from the image embedding v and the text read c."""
        context = self.context(c)
        g = torch.sigmoid(self.gate(torch.cat([image_emb, context], dim=1)))  # (B, 1)
        return F.normalize(image_emb + g * self.dropout(context), dim=1), g.squeeze(1)

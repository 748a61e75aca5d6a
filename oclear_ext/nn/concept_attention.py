"""Multi-head cross-attention module on the fused concept-attention op."""

from __future__ import annotations

from torch import Tensor, nn

from .._ops.concept_attention import concept_attention


class ConceptAttention(nn.Module):
    """Multi-head cross-attention (nn.MultiheadAttention-like, batch first) on oclear_ext.concept_attention.

    Keys and values of batch size 1 are a memory shared by the whole batch (e.g. a learnable concept
    memory): they are projected once and broadcast by the op, never expanded per batch element. The op runs
    the kernel family set by oclear_ext.concept_attention_backend (default "auto"); under torch.autocast the
    projections and the attention run in the autocast dtype.

    Args:
        dim: model dimension D of the queries and of the output; divisible by num_heads, D / num_heads <= 256.
        num_heads: H.
        kdim: feature size of the keys (default D).
        vdim: feature size of the values (default D).
        bias: biases of the q, k, v projections.
        out_bias: bias of the output projection. Without it a query whose keys are all padding gets exactly
            zeros out (the op returns zeros there); with it, the bias.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        out_bias: bool = True,
    ) -> None:
        super().__init__()
        if dim <= 0 or num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"ConceptAttention: dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if dim // num_heads > 256:
            raise ValueError(f"ConceptAttention: head_dim = dim / num_heads must be <= 256, got {dim // num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(kdim or dim, dim, bias=bias)
        self.v_proj = nn.Linear(vdim or dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=out_bias)

    def _heads(self, x: Tensor) -> Tensor:
        # (N, L, D) -> (N, H, L, Dh) as a view: the op reads the strides, no copy.
        n, length, _ = x.shape
        return x.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """query (B, Lq, D), key (B or 1, Lk, kdim), value (B or 1, Lk, vdim), key_padding_mask (B, Lk) bool
        (True = padding) -> (B, Lq, D)."""
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise ValueError(
                "ConceptAttention: query, key and value must be 3-D (batch, length, features), got "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        b, lq, _ = query.shape
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        out = concept_attention(q, k, v, key_padding_mask)  # (B, H, Lq, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, self.dim))

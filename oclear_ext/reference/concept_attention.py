"""Plain-PyTorch concept attention (docs/design.md#concept-attention), materialising the (B, H, Lq, Lk) scores.

out = softmax(scale * q k^T, padding keys masked) v, with k, v of batch 1 broadcast over the batch
by matmul. A query row whose keys are all padding returns zeros with zero gradient (softmax of an
all -inf row would be NaN). Computes in the input dtype, as a plain PyTorch user would.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def concept_attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """Reference of oclear_ext.concept_attention: q (B, H, Lq, Dh), k, v (B or 1, H, Lk, Dh) -> (B, H, Lq, Dh)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if key_padding_mask is None:
        return torch.matmul(torch.softmax(scores, dim=-1), v)
    padding = key_padding_mask[:, None, None, :]
    no_keys = key_padding_mask.all(dim=1)[:, None, None, None]
    scores = scores.masked_fill(padding, float("-inf")).masked_fill(no_keys, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(no_keys, 0.0)
    return torch.matmul(probs, v)

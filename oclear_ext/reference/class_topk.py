"""Plain-PyTorch hardest classes: materialises the N x C cosines and the C scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def hardest_classes(embeddings: Tensor, weight: Tensor, k: int, *, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reference of oclear_ext.hardest_classes: a stable descending sort of max_i cos(x_i, w_c)."""
    with torch.no_grad():
        scores = (F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).t()).max(dim=0).values
        if exclude is not None and exclude.numel():
            scores[exclude] = float("-inf")
        order = torch.sort(scores, descending=True, stable=True).indices[:k]
        return scores[order], order

"""Hardest classes of a batch: the fused scoring op behind top-k negative sampling."""

from __future__ import annotations

import torch
from torch import Tensor

from .autocast import register_weight_preserving_autocast
from .options import current_options


@torch.library.register_fake("oclear::class_topk")
def _class_topk_fake(embeddings, weight, exclude, k, class_chunk=0, backend="auto"):
    acc = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    return embeddings.new_empty(k, dtype=acc), embeddings.new_empty(k, dtype=torch.long)


register_weight_preserving_autocast("oclear::class_topk", torch.ops.oclear.class_topk)


def hardest_classes(embeddings: Tensor, weight: Tensor, k: int, *, exclude: Tensor | None = None,
                    class_chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """The k classes whose centres come closest to any row of the batch, without materialising N x C.

    score_c = max_i cos(embeddings_i, weight_c); classes in `exclude` (e.g. the batch's positives) are
    skipped. Ties go to the smaller class id, so the result equals a stable descending sort of the
    materialised scores (oclear_ext.reference.hardest_classes). No gradient: the scores select classes.

    Args:
        embeddings: (N, D), N >= 1.
        weight: (C, D) class centres on the same device, the embeddings' dtype or float32 beside 16-bit
            embeddings (rounded to their dtype chunk by chunk); under autocast only the embeddings are cast.
        k: how many classes, 0 <= k <= C - len(unique(exclude)).
        exclude: int64 class ids in [0, C), any order, duplicates allowed.
        class_chunk: classes per chunk of the kernel's class loop (None: the oclear_ext.margin_softmax_options
            block's, automatic by default); the result does not depend on it.
    The block's `backend` applies too: "cutlass_sm90" scores every class in one fused CUTLASS GEMM whose
    epilogue keeps the per-class max (Hopper, bfloat16; not yet run on a GPU).
    Returns:
        (scores (k,) float32 (float64 for float64 inputs), class ids (k,) int64), best first.
    """
    if exclude is None:
        exclude = torch.empty(0, dtype=torch.long, device=weight.device)
    elif exclude.dtype == torch.long:
        exclude = torch.unique(exclude)  # sorted, no duplicates: what the kernel walks along the chunks
    with torch.no_grad():
        chunk = class_chunk if class_chunk is not None else current_options().class_chunk
        return torch.ops.oclear.class_topk(embeddings, weight, exclude, k, chunk or 0, current_options().backend)

"""The class-sharded margin softmax: the whole algebra, once, with a comment per step.

World of P ranks (a process group). Rank r holds class rows W_r = W[shard_r] (contiguous, from
`partition`) and a local batch (x_r, y_r) of n rows; every rank has the same n. The loss is that of
the global batch X = [x_0; ...; x_{P-1}] over all classes, identical on every rank:

    L = reduce_i ( LSE_i - z_{i, y_i} ),   LSE_i = log sum_c exp(z_ic)  over all C classes.

Communication per sample: the embedding (D values) and its label once (all-gather), two scalars
(max all-reduce, sum all-reduce of sum-exp and target), and D values of gradient (reduce-scatter):
independent of C.
"""

from __future__ import annotations

import struct

import torch
import torch.distributed as dist
from torch import Tensor

from .._ops.margin_softmax import OP_NAME, MarginSettings, check_reduction, reduce_rows
from .collectives import all_gather_rows, all_reduce_max, gather_rows_with_grad, sum_replicated_with_grad


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


_AGREEMENT_FIELDS = ("local batch size", "embedding dim", "num_classes", "dtype", "scale", "m1", "m2", "m3",
                     "interclass_filter", "ignore_index", "arcface_grad", "reduction")
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def check_ranks_agree(local_embeddings: Tensor, num_classes: int, settings: MarginSettings, reduction: str,
                      group=None) -> None:
    """One small all-gather so that a mismatch raises on every rank instead of hanging a collective."""
    filt = settings.interclass_filter
    mine = [local_embeddings.shape[0], local_embeddings.shape[1], num_classes,
            _DTYPE_CODES.get(local_embeddings.dtype, -1), _float_bits(settings.scale),
            *(_float_bits(m) for m in settings.margin), _float_bits(filt) if filt is not None else -1,
            settings.ignore_index, int(settings.arcface_grad == "straight_through"),
            ("mean", "sum", "none").index(reduction)]
    table = all_gather_rows(torch.tensor([mine], dtype=torch.int64, device=local_embeddings.device), group)
    rows = table.tolist()
    for k, field in enumerate(_AGREEMENT_FIELDS):
        values = [row[k] for row in rows]
        if len(set(values)) > 1:
            shown = values if field in ("local batch size", "embedding dim", "num_classes", "ignore_index") else "differs"
            raise ValueError(f"{OP_NAME} (sharded): ranks disagree on {field}: {shown} (by rank); "
                             "every rank must call with the same batch size and settings")


def sharded_margin_softmax_loss(
    local_embeddings: Tensor,
    local_labels: Tensor,
    weight_shard: Tensor,
    shard: range,
    num_classes: int,
    settings: MarginSettings,
    *,
    reduction: str = "mean",
    group=None,
) -> Tensor:
    """Margin softmax loss of the global batch with the class weights sharded over `group`.

    Args:
        local_embeddings: (n, D) this rank's rows of the batch (same n on every rank).
        local_labels: (n,) int64 global class ids, or settings.ignore_index.
        weight_shard: (len(shard), D) this rank's class rows W[shard].
        shard: this rank's classes, partition(num_classes, world_size)[rank].
    Returns:
        "mean" / "sum": the global batch's loss, identical on every rank ("mean" divides by the number
        of non-ignored rows of all ranks); "none": (world * n,) per-row losses of the global batch.
    """
    check_reduction(reduction)
    if weight_shard.shape[0] != len(shard):
        raise ValueError(f"{OP_NAME} (sharded): weight_shard has {weight_shard.shape[0]} rows but the shard "
                         f"{shard} holds {len(shard)} classes")
    check_ranks_agree(local_embeddings, num_classes, settings, reduction, group)

    # 1. All-gather the batch. Embeddings with autograd: the backward reduce-scatters dL/dX, so each rank
    #    receives the sum over shards of the gradient of its own rows. Labels need no gradient.
    x = gather_rows_with_grad(local_embeddings, group)  # (P n, D)
    labels = all_gather_rows(local_labels, group)  # (P n,)

    # 2. This shard's statistics with the fused op: lse_r = log sum_{c in shard} exp(z_ic), and the
    #    target logit where this shard owns y_i (0 elsewhere). Its backward gives dW_r and shard r's
    #    share of dL/dX.
    lse_r, target_r, _ = torch.ops.oclear.margin_softmax_forward(
        x, weight_shard, labels, shard.start, num_classes, *settings.op_args()
    )

    # 3. All-reduce MAX of the shard maxima. M is only a shift for stability, LSE = M + log sum_r
    #    exp(lse_r - M) holds for any M, so no gradient flows through it.
    m = all_reduce_max(lse_r, group)

    # 4. One SUM all-reduce carries both the rescaled sum-exp (in [1, P]) and the target logit (only the
    #    owner's is non-zero). Its backward is the identity: the upstream gradient is the same on every
    #    rank because every rank computes the same L from these sums.
    sums = sum_replicated_with_grad(torch.stack([torch.exp(lse_r - m), target_r]), group)
    lse = m + torch.log(sums[0])
    target = sums[1]

    # 5. The loss, from replicated quantities only, hence identical on every rank. Ignored rows are known
    #    everywhere (labels were gathered), so "mean" divides by the global count of valid rows.
    return reduce_rows(lse - target, labels != settings.ignore_index, reduction)


def world_and_rank(group=None) -> tuple[int, int]:
    """(world size, rank) of `group`, or (1, 0) when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)

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

import math
import struct
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor

from .._ops.margin_softmax import OP_NAME, MarginSettings, check_reduction, reduce_rows
from .._ops.negatives import LOCAL_IGNORE, Negatives, restrict_to_active, sample_active
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
    negatives: Negatives | None = None,
    sparse_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Margin softmax loss of the global batch with the class weights sharded over `group`.

    Args:
        local_embeddings: (n, D) this rank's rows of the batch (same n on every rank).
        local_labels: (n,) int64 global class ids, or settings.ignore_index.
        weight_shard: (len(shard), D) this rank's class rows W[shard].
        shard: this rank's classes, partition(num_classes, world_size)[rank].
        negatives: None (every class of every shard), or a sampler applied by each shard to its own
            classes: the shard's positives in the global batch plus, for TopKNegatives(k), the k hardest of
            its other classes (scored against the whole global batch) and, for RandomNegatives(rate), enough
            uniform draws to make rate * len(shard) classes (count: that many per shard). The global active
            set is the union over shards; a shard may end up with none.
        sparse_grad: with negatives, weight_shard.grad becomes row-sparse (the active rows only).
    Returns:
        (loss, active): "mean" / "sum": the global batch's loss, identical on every rank ("mean" divides by
        the number of non-ignored rows of all ranks); "none": (world * n,) per-row losses of the global
        batch. active: this shard's active class ids (global, sorted), or None without negatives.
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
    valid = labels != settings.ignore_index

    # 2. This shard's statistics with the fused op: lse_r = log sum_{c in shard} exp(z_ic), and the
    #    target logit where this shard owns y_i (0 elsewhere). Its backward gives dW_r and shard r's
    #    share of dL/dX. With sampling, the same over the shard's active classes only.
    if negatives is None:
        active = None
        lse_r, target_r, _ = torch.ops.oclear.margin_softmax_forward(
            x, weight_shard, labels, shard.start, num_classes, *settings.op_args()
        )
    else:
        active, lse_r, target_r = _sampled_shard_statistics(x, labels, valid, weight_shard, shard, settings,
                                                            negatives, sparse_grad)

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
    return reduce_rows(lse - target, valid, reduction), active


def _sampled_shard_statistics(x: Tensor, labels: Tensor, valid: Tensor, weight_shard: Tensor, shard: range,
                              settings: MarginSettings, negatives: Negatives,
                              sparse_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(this shard's active class ids (global), lse_r, target_r) over the shard's sampled classes."""
    owned = valid & (labels >= shard.start) & (labels < shard.stop)
    local_labels = labels - shard.start
    positives = torch.unique(local_labels[owned])
    scoring_rows = x[valid] if bool(valid.any()) else x
    active = sample_active(negatives, scoring_rows.detach(), weight_shard, positives)
    if active.numel() == 0 and not bool(valid.any()) and shard.start == 0:
        active = torch.zeros(1, dtype=torch.long, device=x.device)  # all rows ignored: one placeholder class
    if active.numel() == 0:
        # Nothing of this shard takes part: lse_r = -inf contributes exp(-inf - M) = 0 to every row's sum.
        # Some other shard is not empty (the placeholder above guarantees it), so M stays finite. The
        # 0 * x term keeps x in this rank's graph: its backward must still join the reduce-scatter.
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        lse_r = (x.to(acc) * 0).sum(1) - math.inf
        return active + shard.start, lse_r, torch.zeros_like(lse_r)
    rows, block_labels = restrict_to_active(weight_shard, local_labels, active, owned, sparse_grad)
    lse_r, target_r, _ = torch.ops.oclear.margin_softmax_forward(
        x, rows, block_labels, 0, rows.shape[0], *replace(settings, ignore_index=LOCAL_IGNORE).op_args()
    )
    return active + shard.start, lse_r, target_r


def world_and_rank(group=None) -> tuple[int, int]:
    """(world size, rank) of `group`, or (1, 0) when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)

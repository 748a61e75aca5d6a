"""The class-sharded margin softmax: the whole algebra, once, with a comment per step.

World of P ranks (a process group). Rank r holds class rows W_r = W[shard_r] (contiguous, from
`partition`) and a local batch (x_r, y_r) of n rows; every rank has the same n. The loss is that of
the global batch X = [x_0; ...; x_{P-1}] over all classes, identical on every rank:

    L = reduce_i ( LSE_i - z_{i, y_i} ),   LSE_i = log sum_c exp(z_ic)  over all C classes.

Communication per sample: the embedding (D values) and its label once (all-gather), two scalars
(max all-reduce, sum all-reduce of sum-exp and target), and D values of gradient (reduce-scatter):
independent of C. Before the first of these, the ranks check that they agree on the configuration
(batch size, dims, dtypes, settings): a mismatch would otherwise hang (NCCL) or abort (gloo) a collective.
"""

from __future__ import annotations

import math
import struct
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor

from .._ops.margin_softmax import OP_NAME, MarginSettings, check_reduction, reduce_rows
from .._ops.negatives import (LOCAL_IGNORE, Negatives, TopKNegatives, check_fixed_size,
                              fixed_size_active, is_fixed_size, restrict_to_active, sample_active)
from .collectives import (
    all_gather_rows,
    all_reduce_max,
    gather_rows_with_grad,
    own_rows_of_replicated,
    sum_replicated_with_grad,
)


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


_AGREEMENT_FIELDS = ("local batch size", "embedding dim", "label count", "num_classes", "dtype", "label dtype",
                     "scale", "m1", "m2", "m3", "interclass_filter", "ignore_index", "arcface_grad", "reduction")
_SHOWN_FIELDS = ("local batch size", "embedding dim", "label count", "num_classes", "ignore_index")
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3, torch.int64: 4,
                torch.int32: 5}


def check_ranks_agree(local_embeddings: Tensor, num_classes: int, settings: MarginSettings, reduction: str,
                      group=None, local_labels: Tensor | None = None) -> None:
    """One small all-gather (and a host read of it) so that a mismatch raises on every rank instead of hanging
    (NCCL) or aborting (gloo) the collectives that follow. ValueError naming the field and, for sizes, the
    value of every rank."""
    filt = settings.interclass_filter
    labels_count = local_labels.numel() if local_labels is not None else local_embeddings.shape[0]
    labels_dtype = local_labels.dtype if local_labels is not None else torch.int64
    mine = [local_embeddings.shape[0], local_embeddings.shape[1], labels_count, num_classes,
            _DTYPE_CODES.get(local_embeddings.dtype, -1), _DTYPE_CODES.get(labels_dtype, -1),
            _float_bits(settings.scale), *(_float_bits(m) for m in settings.margin),
            _float_bits(filt) if filt is not None else -1, settings.ignore_index,
            int(settings.arcface_grad == "straight_through"), ("mean", "sum", "none").index(reduction)]
    table = all_gather_rows(torch.tensor([mine], dtype=torch.int64, device=local_embeddings.device), group)
    rows = table.tolist()
    for k, field in enumerate(_AGREEMENT_FIELDS):
        values = [row[k] for row in rows]
        if len(set(values)) > 1:
            shown = values if field in _SHOWN_FIELDS else "differs"
            raise ValueError(f"{OP_NAME} (sharded): ranks disagree on {field}: {shown} (by rank); "
                             "every rank must call with the same batch size and settings")


class RankAgreement:
    """Runs check_ranks_agree once per distinct configuration instead of on every forward.

    The check costs an all-gather and a host read of it (on CUDA a stream synchronisation) per call, while a
    training loop repeats one configuration (batch size, dims, dtypes, settings) step after step. This object
    remembers the configurations the ranks have agreed on, and `check` runs the collective only for a
    configuration this rank has not agreed on before (always=True: on every call, the debug mode).

    What the cache cannot see: a rank whose configuration changes while another rank repeats one already
    agreed on (e.g. only one rank's loader yields a short last batch). The first runs the check, the second
    goes on to the embeddings' all-gather, and the mismatched collectives abort the processes (gloo) or hang
    until the process group's timeout (NCCL); telling the two apart on every rank would need a collective
    and a host read on every call, which is what always=True does. Equal batch sizes on every rank are the
    contract (oclear's RankBatchSampler provides them, as does torch's DistributedSampler, which gives every
    rank as many samples); changes every rank makes at the same step (a new batch size everywhere, autocast)
    are checked like the first call.
    """

    def __init__(self, always: bool = False) -> None:
        self.always = always
        self.agreed: set[tuple] = set()
        self.collective_checks = 0  # how many times the all-gather ran (tests and diagnostics)

    def check(self, local_embeddings: Tensor, local_labels: Tensor, num_classes: int, settings: MarginSettings,
              reduction: str, group=None) -> None:
        # Everything the collectives' sizes or the loss's meaning depend on. MarginSettings is a frozen
        # dataclass, hence hashable; building the key costs no communication.
        key = (tuple(local_embeddings.shape), local_embeddings.dtype, tuple(local_labels.shape), local_labels.dtype,
               num_classes, settings, reduction, local_embeddings.device.type)
        if not self.always and key in self.agreed:
            return
        check_ranks_agree(local_embeddings, num_classes, settings, reduction, group, local_labels)
        self.collective_checks += 1
        self.agreed.add(key)


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
    agreement: RankAgreement | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Margin softmax loss of the global batch with the class weights sharded over `group`.

    Collective: every rank of `group` calls it, with the same batch size and settings, and runs the backward.

    Args:
        local_embeddings: (n, D) this rank's rows of the batch (same n on every rank).
        local_labels: (n,) int64 global class ids, or settings.ignore_index.
        weight_shard: (len(shard), D) this rank's class rows W[shard], a plain tensor (for a DTensor weight,
            its to_local()). May hold no rows (partition leaves trailing shards empty when C is small).
        shard: this rank's classes, partition(num_classes, world_size)[rank].
        negatives: None (every class of every shard), or a sampler applied by each shard to its own
            classes: the shard's positives in the global batch plus, for TopKNegatives(k), the k hardest of
            its other classes (scored against the whole global batch; all of them on a shard with fewer)
            and, for RandomNegatives(rate), enough uniform draws to make rate * len(shard) classes (count:
            that many per shard). The global active set is the union over shards; a shard may end up with none.
        sparse_grad: with negatives, weight_shard.grad becomes row-sparse (the active rows only).
        agreement: a RankAgreement caching the configurations the ranks agreed on (the check's collective then
            runs once per configuration); None checks on every call.
    Returns:
        (loss, active): "mean" / "sum": the global batch's loss, identical on every rank ("mean" divides by
        the number of non-ignored rows of all ranks); "none": (n,) the per-row losses of THIS rank's rows
        (0 for ignored rows), whose backward is exact for any function of them on each rank: the objective
        is the sum over ranks of what each rank backpropagates from its rows, as with reduction="sum".
        active: this shard's active class ids (global, sorted), or None without negatives.
    """
    if settings.backward_mode() == "store":
        raise ValueError("oclear_ext: the class-sharded margin softmax does not take backward='store' yet "
                         "(each shard's softmax would keep its own N x C_local values); use backward='recompute'")
    check_reduction(reduction)
    if weight_shard.shape[0] != len(shard):
        raise ValueError(f"{OP_NAME} (sharded): weight_shard has {weight_shard.shape[0]} rows but the shard "
                         f"{shard} holds {len(shard)} classes")
    if isinstance(negatives, TopKNegatives) and negatives.k > num_classes:
        # Checked here, identically on every rank: a shard raising alone would leave the others hanging.
        raise ValueError(f"TopKNegatives: k = {negatives.k} exceeds the number of classes, {num_classes}")
    if is_fixed_size(negatives):
        # From shapes, the same on every rank: the global batch's rows, and the largest shard (ceil(C / P)).
        world = dist.get_world_size(group)
        check_fixed_size(negatives, local_labels.shape[0] * world, math.ceil(num_classes / world),
                         local_embeddings.device)
    if agreement is None:
        check_ranks_agree(local_embeddings, num_classes, settings, reduction, group, local_labels)
    else:
        agreement.check(local_embeddings, local_labels, num_classes, settings, reduction, group)

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
        if len(shard) == 0:
            lse_r, target_r = _no_class_statistics(x, weight_shard)
        else:
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
    loss = reduce_rows(lse - target, valid, reduction)
    if reduction == "none":
        # Each rank keeps its own rows. Their gradients differ by rank, so the backward all-gathers them:
        # step 4's identity backward needs the same upstream gradient (of all P n rows) on every rank.
        loss = own_rows_of_replicated(loss, group)
    return loss, active


def _no_class_statistics(x: Tensor, no_rows: Tensor) -> tuple[Tensor, Tensor]:
    """(lse_r, target_r) of a shard taking no part: lse_r = -inf adds exp(-inf - M) = 0 to every row's sum.

    Some other shard holds classes, so M stays finite. The 0 * x term keeps x in this rank's graph: its
    backward must still join the reduce-scatter of dL/dX. `no_rows`, (0, D) rows taken from the shard's
    weight, joins the graph the same way, so the weight gets a gradient (zero, or row-sparse without rows)
    on every rank alike: optimizers step, and count the step, on every rank, and collectives over gradients
    (clip_grad_norm_ of DTensors) run on every rank.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    lse_r = (x.to(acc) * 0).sum(1) + no_rows.to(acc).sum() * 0 - math.inf
    return lse_r, torch.zeros_like(lse_r)


def _sampled_shard_statistics(x: Tensor, labels: Tensor, valid: Tensor, weight_shard: Tensor, shard: range,
                              settings: MarginSettings, negatives: Negatives,
                              sparse_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(this shard's active class ids (global), lse_r, target_r) over the shard's sampled classes."""
    owned = valid & (labels >= shard.start) & (labels < shard.stop)
    local_labels = labels - shard.start
    if len(shard) == 0:
        active = torch.empty(0, dtype=torch.long, device=x.device)
    elif is_fixed_size(negatives):  # no host read: min(size, len(shard)) classes (checked by the caller)
        active = fixed_size_active(negatives, local_labels, owned, len(shard))
    else:
        if isinstance(negatives, TopKNegatives) and negatives.k > len(shard):
            negatives = replace(negatives, k=len(shard))  # a small shard offers all of its classes
        positives = torch.unique(local_labels[owned])
        scoring_rows = x[valid] if bool(valid.any()) else x
        active = sample_active(negatives, scoring_rows.detach(), weight_shard, positives)
        if active.numel() == 0 and not bool(valid.any()) and shard.start == 0:
            active = torch.zeros(1, dtype=torch.long, device=x.device)  # all rows ignored: one placeholder class
    if active.numel() == 0:  # a shape, not a value: no host read
        no_rows = torch.nn.functional.embedding(active, weight_shard, sparse=sparse_grad)
        lse_r, target_r = _no_class_statistics(x, no_rows)
        return active + shard.start, lse_r, target_r
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

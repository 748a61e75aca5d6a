"""Negative-class sampling: which classes a margin softmax step is computed over.

The active set is sorted, without duplicates, and always holds every positive class of the batch (the
labels of its non-ignored rows); the loss is then the margin softmax over the active classes only
(Partial FC). Two ways to add negatives:
- RandomNegatives: uniformly sampled classes (insightface's Partial FC); with `size`, an active set of a
  fixed size, chosen on the device without reading anything back to the host (no CUDA synchronisation,
  static shapes for torch.compile);
- TopKNegatives: the k classes whose centres come closest to any embedding of the batch (hardest
  negatives, found by the fused scoring op without materialising N x C), plus optional random extras.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .class_topk import hardest_classes


@dataclass(frozen=True)
class RandomNegatives:
    """Every positive class plus uniformly sampled negatives.

    rate: the active set holds max(#positives, ceil(rate * C)) classes (Partial FC's sample rate).
    count: that many negatives on top of the positives (fewer if fewer classes are left).
    size: exactly min(size, C) classes: every positive, the rest uniform negatives. The set is chosen on the
        device with shapes known in advance (no host read, so no CUDA synchronisation, and torch.compile
        traces it without a graph break when generator is None). That needs room for every positive without
        counting them: size must be >= the number of labelled rows the call sees (the batch; the global
        batch for the sharded head), or >= C (then every class is active); checked from shapes.
    Exactly one of rate, count and size. generator: torch.Generator for reproducible draws; with size it
    must live on the embeddings' device (the draw is made there).
    """

    rate: float | None = None
    count: int | None = None
    generator: torch.Generator | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        if sum(v is not None for v in (self.rate, self.count, self.size)) != 1:
            raise ValueError(f"RandomNegatives: give exactly one of rate, count and size, got rate={self.rate}, "
                             f"count={self.count}, size={self.size}")
        if self.size is not None and (not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1):
            raise ValueError(f"RandomNegatives: size must be an int >= 1, got {self.size!r}")
        if self.rate is not None and not (isinstance(self.rate, (int, float)) and 0.0 < self.rate <= 1.0):
            raise ValueError(f"RandomNegatives: rate must be in (0, 1], got {self.rate!r}")
        if self.count is not None and (not isinstance(self.count, int) or isinstance(self.count, bool) or self.count < 0):
            raise ValueError(f"RandomNegatives: count must be an int >= 0, got {self.count!r}")

    def num_negatives(self, num_classes: int, num_positives: int) -> int:
        left = num_classes - num_positives
        if self.count is not None:
            return min(self.count, left)
        return min(max(math.ceil(self.rate * num_classes) - num_positives, 0), left)


@dataclass(frozen=True)
class TopKNegatives:
    """Every positive class plus the k hardest negatives (highest batch-max cosine), plus `random` uniform extras.

    Ties are broken by class id, so the selection is deterministic. 0 <= k <= C (checked per call); when
    the batch's positives leave fewer than k other classes, all of them are taken, so TopKNegatives(k=C)
    is the full softmax.
    """

    k: int
    random: int = 0
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        for name in ("k", "random"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TopKNegatives: {name} must be an int >= 0, got {value!r}")


Negatives = RandomNegatives | TopKNegatives


def _uniform_classes(num_classes: int, count: int, taken: Tensor, generator, device) -> Tensor:
    """`count` distinct classes drawn uniformly from those not in `taken` (sorted)."""
    if count == 0:
        return taken.new_empty(0)
    perm = torch.randperm(num_classes, generator=generator, device="cpu").to(device)
    free = perm[~torch.isin(perm, taken)]
    return free[:count]


# Label of an ignored row after renumbering to positions in an active set: negative, so that it can never
# collide with a position even when the user's ignore_index is a class id >= 0.
LOCAL_IGNORE = -1


GRAPH_BREAK_REASON = ("the active class set's size depends on the labels' values: the negative sampling runs "
                      "eagerly, the gather and the loss around it compile")


def _eager(fn):
    """torch.compiler.disable with the reason shown in the graph-break message (torch >= 2.9 takes one)."""
    try:
        return torch.compiler.disable(fn, reason=GRAPH_BREAK_REASON)
    except TypeError:
        return torch.compiler.disable(fn)


def fixed_size_active(negatives: RandomNegatives, labels: Tensor, valid: Tensor, num_classes: int) -> Tensor:
    """RandomNegatives(size=K): the sorted ids of exactly min(K, C) classes, every positive among them.

    Positives score 2 (scattered by max: deterministic with repeated labels), every class adds a uniform draw
    in [0, 1), and top-k keeps the K highest: all positives (they fit: check_fixed_size), then a uniform
    sample of the other classes. No step reads a value back to the host.
    """
    marks = torch.zeros(num_classes, device=labels.device).scatter_reduce_(
        0, torch.where(valid, labels, 0), valid.to(torch.float32) * 2, reduce="amax")
    scores = marks + torch.rand(num_classes, generator=negatives.generator, device=labels.device)
    return torch.sort(torch.topk(scores, min(negatives.size, num_classes), sorted=False).indices).values


def is_fixed_size(negatives: Negatives | None) -> bool:
    """RandomNegatives(size=K): the active set is chosen on the device, without a host read."""
    return isinstance(negatives, RandomNegatives) and negatives.size is not None


def check_fixed_size(negatives: RandomNegatives, rows: int, num_classes: int, device: torch.device) -> None:
    """RandomNegatives(size=K), from shapes only: K >= the labelled rows (or >= C) so that every positive fits
    without counting them, and a generator on the device where the draw is made."""
    if negatives.size < min(rows, num_classes):
        raise ValueError(f"RandomNegatives: size = {negatives.size} cannot hold the positives of {rows} rows "
                         f"among {num_classes} classes; size must be >= {min(rows, num_classes)} (the rows, or the "
                         f"number of classes)")
    gen = negatives.generator
    if gen is not None and gen.device.type != torch.device(device).type:
        raise ValueError(f"RandomNegatives(size=...): the generator is on {gen.device} but the draw is made on "
                         f"{device}; create it there (torch.Generator(device=...))")


def active_classes(
    negatives: Negatives, embeddings: Tensor, weight: Tensor, labels: Tensor, ignore_index: int
) -> Tensor:
    """The sorted active class ids (int64) for one step: the positives plus the sampled negatives.

    Never empty: a batch whose rows are all ignored and that samples no negative gets class 0 as a
    placeholder (the loss of such a batch is 0 whatever the classes).
    """
    if is_fixed_size(negatives):
        check_fixed_size(negatives, labels.shape[0], weight.shape[0], labels.device)
        return fixed_size_active(negatives, labels, labels != ignore_index, weight.shape[0])
    return data_dependent_active_classes(negatives, embeddings, weight, labels, ignore_index)


# Here the active set's size depends on the labels' values (and top-k sorts by scores): torch.compile cannot
# trace it into a graph of static shapes, so the selection is one deliberate graph break, and everything
# around it (gathering the active rows, the loss and its backward) compiles. torch.compile(fullgraph=True) of
# such a sampled loss therefore raises; compile without fullgraph, or use RandomNegatives(size=...).
@_eager
def data_dependent_active_classes(
    negatives: Negatives, embeddings: Tensor, weight: Tensor, labels: Tensor, ignore_index: int
) -> Tensor:
    """active_classes for every sampler but RandomNegatives(size=...): sizes read from the labels."""
    valid = labels != ignore_index
    # Ignored rows (possibly padding) must not score: each takes the first labelled row's place (a repeated
    # row leaves every column max unchanged), chosen on the device without reading `valid` back to the host.
    # With no labelled row at all the choice does not matter: such a batch's loss is 0.
    first = torch.argmax(valid.to(torch.uint8))
    scoring_rows = torch.where(valid[:, None], embeddings, embeddings[first])
    ids = sample_active(negatives, scoring_rows, weight, torch.unique(labels[valid]))
    return ids if ids.numel() else torch.zeros(1, dtype=torch.long, device=labels.device)


def sample_active(negatives: Negatives, scoring_rows: Tensor, weight: Tensor, positives: Tensor) -> Tensor:
    """Sorted ids (rows of `weight`) of `positives` (sorted, unique) plus the negatives `negatives` samples
    among the other rows; top-k scores them against `scoring_rows`. May be empty."""
    num_classes = weight.shape[0]
    if isinstance(negatives, RandomNegatives):
        if negatives.size is not None:
            raise ValueError("sample_active: RandomNegatives(size=...) is chosen by fixed_size_active")
        extra = _uniform_classes(num_classes, negatives.num_negatives(num_classes, positives.numel()), positives,
                                 negatives.generator, positives.device)
        return torch.sort(torch.cat([positives, extra])).values
    if isinstance(negatives, TopKNegatives):
        if negatives.k > num_classes:
            raise ValueError(f"TopKNegatives: k = {negatives.k} exceeds the number of classes, {num_classes}")
        k = min(negatives.k, num_classes - positives.numel())
        _, hard = hardest_classes(scoring_rows.detach(), weight.detach(), k, exclude=positives)
        taken = torch.sort(torch.cat([positives, hard])).values
        extra_count = min(negatives.random, num_classes - taken.numel())
        extra = _uniform_classes(num_classes, extra_count, taken, negatives.generator, positives.device)
        return torch.sort(torch.cat([taken, extra])).values
    raise TypeError(f"negatives must be None, RandomNegatives or TopKNegatives, got {type(negatives).__name__}")


def restrict_to_active(weight: Tensor, labels: Tensor, active: Tensor, owned: Tensor,
                       sparse_grad: bool = False) -> tuple[Tensor, Tensor]:
    """(the active rows of weight, labels renumbered to positions in `active`, LOCAL_IGNORE where not `owned`).

    `labels` are ids of weight's rows wherever `owned` is True (there they must be in `active`). With
    sparse_grad the rows are gathered by F.embedding(sparse=True), so weight.grad becomes a sparse
    (row-sparse) tensor holding only the active rows instead of a dense C x D tensor.
    """
    rows = torch.nn.functional.embedding(active, weight, sparse=sparse_grad)
    local = torch.searchsorted(active, torch.where(owned, labels, active[:1].expand_as(labels)))
    return rows, torch.where(owned, local, torch.full_like(labels, LOCAL_IGNORE))

"""Negative-class sampling: which classes a margin softmax step is computed over.

The active set is sorted, without duplicates, and always holds every positive class of the batch (the
labels of its non-ignored rows); the loss is then the margin softmax over the active classes only
(Partial FC). Two ways to add negatives:
- RandomNegatives: uniformly sampled classes (insightface's Partial FC);
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
    Exactly one of rate and count. generator: torch.Generator for reproducible draws.
    """

    rate: float | None = None
    count: int | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.count is None):
            raise ValueError(f"RandomNegatives: give exactly one of rate and count, got rate={self.rate}, count={self.count}")
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


# The active set's size depends on the labels' values (and top-k sorts by scores): torch.compile cannot trace
# it into a graph of static shapes, so the selection is one deliberate graph break, and everything around it
# (gathering the active rows, the loss and its backward) compiles. torch.compile(fullgraph=True) of a
# sampled loss therefore raises; compile without fullgraph.
@_eager
def active_classes(
    negatives: Negatives, embeddings: Tensor, weight: Tensor, labels: Tensor, ignore_index: int
) -> Tensor:
    """The sorted active class ids (int64) for one step: the positives plus the sampled negatives.

    Never empty: a batch whose rows are all ignored and that samples no negative gets class 0 as a
    placeholder (the loss of such a batch is 0 whatever the classes).
    """
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

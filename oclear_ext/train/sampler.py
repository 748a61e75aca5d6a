"""Batches of one rank for one epoch: deterministic, resumable mid-epoch, optionally weighted."""

from __future__ import annotations

import torch
from torch import Tensor


class RankBatchSampler:
    """Yields this rank's batches (lists of dataset indices) for the epoch set by set_epoch.

    The epoch's order is a permutation of the dataset drawn from a generator seeded by (seed, epoch), or,
    with weights, len(weights) draws with replacement proportional to them (class-balanced sampling); rank r
    takes positions r, r + world, ... of it, so ranks see disjoint rows. Every rank yields the same number
    of full batches (the sharded classifier needs equal batch sizes), so up to world * batch_size - 1 rows
    of an epoch's order go unused; a new order every epoch leaves none out for good. `start_batch` skips
    batches already trained on (exact resume mid-epoch).
    """

    def __init__(self, num_rows: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 weights: Tensor | None = None) -> None:
        if num_rows < batch_size * world_size:
            raise ValueError(f"RankBatchSampler: {num_rows} rows cannot fill one batch of {batch_size} on each of "
                             f"{world_size} processes")
        if weights is not None and (weights.shape != (num_rows,) or not bool((weights > 0).all())):
            raise ValueError(f"RankBatchSampler: weights must be ({num_rows},) and > 0")
        self.num_rows, self.batch_size, self.rank, self.world_size = num_rows, batch_size, rank, world_size
        self.seed, self.weights = seed, weights
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.num_rows // (self.batch_size * self.world_size)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.num_rows, generator=gen)
        else:
            order = torch.multinomial(self.weights.double(), self.num_rows, replacement=True, generator=gen)
        mine = order[self.rank :: self.world_size][: len(self) * self.batch_size]
        for b in range(self.start_batch, len(self)):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size].tolist()

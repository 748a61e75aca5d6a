"""RankBatchSampler: disjoint ranks, equal full batches, resumable mid-epoch, weighted draws."""

from __future__ import annotations

import pytest
import torch

from oclear_ext.train.sampler import RankBatchSampler


def test_ranks_get_disjoint_equal_batches_and_a_new_order_each_epoch():
    samplers = [RankBatchSampler(103, 5, rank=r, world_size=3, seed=1) for r in range(3)]
    batches = [list(s) for s in samplers]
    assert all(len(b) == 6 and all(len(x) == 5 for x in b) for b in batches)  # 103 // 15 = 6 full batches
    rows = [i for b in batches for x in b for i in x]
    assert len(rows) == len(set(rows)) == 90
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != batches[0]


def test_start_batch_resumes_the_same_order():
    sampler = RankBatchSampler(40, 4, seed=3)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, start_batch=7)
    assert list(sampler) == whole[7:]


def test_weighted_draws_follow_the_weights():
    weights = torch.tensor([1.0] * 50 + [9.0] * 50)
    sampler = RankBatchSampler(100, 10, seed=0, weights=weights)
    counts = torch.zeros(100)
    for epoch in range(40):
        sampler.set_epoch(epoch)
        for batch in sampler:
            counts[batch] += 1
    assert 7.0 < counts[50:].sum() / counts[:50].sum() < 11.5  # expected 9


@pytest.mark.parametrize("kw, match", [(dict(num_rows=5, batch_size=3, world_size=2), "cannot fill one batch"),
                                       (dict(num_rows=4, batch_size=2, weights=torch.tensor([1.0, 0.0, 1.0, 1.0])),
                                        "weights must be")])
def test_bad_sampler_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        RankBatchSampler(**kw)

"""FSDP2 (fully_shard) for the encoders beside the class-sharded head, on 2 gloo processes (CPU): gradients
summed over ranks, equal to the DDP path and to one process on the global batch."""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks
from dist_workers import encoder_problem, encoder_step, make_encoder

from oclear_ext.nn import MarginSoftmaxLoss, ShardedMarginClassifier

COSFACE = dict(scale=16.0, margin=(1.0, 0.0, 0.35))
RTOL, ATOL = 1e-10, 1e-12  # float64


def single_process_step(cfg, world_size):
    """The same step on one process: the global batch through one encoder and the full head."""
    x, w, labels = encoder_problem(world_size, cfg)
    encoder = make_encoder(cfg["in_dim"], cfg["dim"])
    head = MarginSoftmaxLoss(cfg["num_classes"], cfg["dim"], dtype=torch.float64, **cfg["settings"])
    with torch.no_grad():
        head.weight.copy_(w)
    opt = torch.optim.SGD([*encoder.parameters(), head.weight], lr=0.5)
    loss = head(encoder(x), labels)
    loss.backward()
    grads = [p.grad.clone() for p in encoder.parameters()]
    opt.step()
    return {"loss": loss.item(), "grads": grads, "params": [p.detach().clone() for p in encoder.parameters()],
            "head": head.weight.detach().clone(), "next_loss": head(encoder(x), labels).item()}


@pytest.mark.slow
def test_fully_sharded_encoders_equal_ddp_and_one_process():
    world = 2
    cfg = dict(n_local=5, num_classes=13, in_dim=7, dim=6, seed=21, settings=COSFACE)  # chunks of 7 and 6
    per_rank = run_ranks(encoder_step, world, cfg)
    single = single_process_step(cfg, world)
    for way in ("ddp", "fsdp", "fsdp_parent"):
        results = [r[way] for r in per_rank]
        assert all(r["sharded"] == [way != "ddp"] * 4 for r in results)  # FSDP2's parameters are DTensors
        for r in results:  # identical on every rank, and equal to one process's step
            assert r["loss"] == pytest.approx(single["loss"], rel=1e-12)
            assert r["next_loss"] == pytest.approx(single["next_loss"], rel=1e-12)
            for got, expected in zip(r["grads"] + r["params"], single["grads"] + single["params"]):
                torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(torch.cat([r["head"] for r in results]), single["head"], rtol=RTOL, atol=ATOL)
    for r in per_rank:  # FSDP2 vs DDP directly: the summed gradients, not the averaged ones
        for fsdp, ddp in zip(r["fsdp"]["grads"], r["ddp"]["grads"]):
            torch.testing.assert_close(fsdp, ddp, rtol=RTOL, atol=ATOL)


def test_fsdp_sum_gradients_needs_a_fully_sharded_module():
    from oclear_ext.distributed import fsdp_sum_gradients

    with pytest.raises(TypeError, match="expected a module sharded with torch.distributed.fsdp.fully_shard, "
                                        "found no FSDP module in Linear"):
        fsdp_sum_gradients(torch.nn.Linear(2, 2))
    assert ShardedMarginClassifier  # the head stays outside fully_shard (see oclear_ext/distributed/fsdp.py)

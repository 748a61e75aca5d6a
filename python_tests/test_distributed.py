"""Hybrid parallelism on 2-4 gloo processes: sharded loss and gradients equal the single-process loss."""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import time

import pytest
import torch
from dist_harness import run_ranks
from dist_workers import (
    global_problem,
    load_checkpoint_and_loss,
    mismatched_batch,
    mismatched_margin,
    save_checkpoint,
    save_forever,
    sharded_loss_and_grads,
)
from hypothesis import given
from hypothesis import strategies as st

from torch.distributed.tensor import Shard

from oclear_ext import RandomNegatives, TopKNegatives, reference
from oclear_ext.distributed import load_sharded, partition, read_index, save_sharded
from oclear_ext.nn import MarginSoftmaxLoss, ShardedMarginClassifier

COSFACE = dict(scale=32.0, margin=(1.0, 0.0, 0.35))
ARCFACE = dict(scale=32.0, margin=(1.0, 0.5, 0.0))
COMBINED_FILTERED = dict(scale=16.0, margin=(1.2, 0.2, 0.1), interclass_filter=0.6, arcface_grad="straight_through")
# float64 throughout: the sharded loss differs from the single-process one only by summation order.
RTOL, ATOL = 1e-10, 1e-12


@given(num_classes=st.integers(1, 500), world_size=st.integers(1, 16))
def test_partition_is_contiguous_complete_and_dtensors_shard_layout(num_classes, world_size):
    shards = partition(num_classes, world_size)
    assert len(shards) == world_size and shards[0].start == 0 and shards[-1].stop == num_classes
    assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))
    # DTensor's Shard(0) layout is torch.chunk's, padded with empty shards: what DCP and state_dict assume.
    chunks = [len(c) for c in torch.arange(num_classes).chunk(world_size)]
    assert [len(s) for s in shards] == chunks + [0] * (world_size - len(chunks))
    for rank, s in enumerate(shards):
        assert Shard.local_shard_size_and_offset(num_classes, world_size, rank) == (len(s), s.start)


@pytest.mark.parametrize("bad", [(0, 2), (10, 0), (3.5, 1), (True, 1)])
def test_partition_rejects_bad_arguments(bad):
    with pytest.raises(ValueError, match="must be a positive int"):
        partition(*bad)


def test_world_size_one_is_margin_softmax_loss():
    torch.manual_seed(0)
    sharded = ShardedMarginClassifier(50, 8, **ARCFACE)
    plain = MarginSoftmaxLoss(50, 8, **ARCFACE)
    plain.weight.data.copy_(sharded.weight.data)
    x, labels = torch.randn(6, 8), torch.randint(0, 50, (6,))
    assert sharded.shard == range(0, 50)
    torch.testing.assert_close(sharded(x, labels), plain(x, labels))


def single_process(cfg, world_size):
    x, w, labels = global_problem(world_size, cfg["n_local"], cfg["num_classes"], cfg["dim"], cfg["seed"])
    x.requires_grad_(True)
    module = MarginSoftmaxLoss(cfg["num_classes"], cfg["dim"], dtype=torch.float64, **cfg["settings"])
    with torch.no_grad():
        module.weight.copy_(w)
    loss = module(x, labels)
    loss.backward()
    return loss.detach(), x.grad, module.weight.grad


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sharded_equals_single_process(world_size):
    # Uneven shards (37 and 101 classes do not divide by 2, 3, 4), ignored rows, three margin settings; 9
    # classes at world 4 leave the last rank an empty shard (3, 3, 3, 0).
    configs = [
        dict(n_local=5, num_classes=37, dim=6, seed=1, settings=COSFACE),
        dict(n_local=3, num_classes=101, dim=9, seed=2, settings=ARCFACE),
        dict(n_local=4, num_classes=37, dim=5, seed=3, settings=COMBINED_FILTERED),
        dict(n_local=2, num_classes=9, dim=4, seed=8, settings=COSFACE),
    ]
    per_rank = run_ranks(sharded_loss_and_grads, world_size, configs)
    for k, cfg in enumerate(configs):
        loss, grad_x, grad_w = single_process(cfg, world_size)
        results = [r[k] for r in per_rank]
        for r in results:  # the global loss, identical on every rank
            torch.testing.assert_close(r["loss"], loss, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(torch.cat([r["grad_x"] for r in results]), grad_x, rtol=RTOL, atol=ATOL)
        shards = [r["shard"] for r in results]
        assert shards == [(s.start, s.stop) for s in partition(cfg["num_classes"], world_size)]
        # The weight is a DTensor and the gradient reached it as one (dense, Shard(0)), equal to the
        # single-process gradient's rows.
        assert all(r["weight_is_dtensor"] and r["grad_type"] == ("DTensor", False) for r in results)
        torch.testing.assert_close(torch.cat([r["grad_w"] for r in results]), grad_w, rtol=RTOL, atol=ATOL)


def sampled_reference(cfg, world_size, active):
    """The single-process loss and gradients over the union of the shards' active classes."""
    x, w, labels = global_problem(world_size, cfg["n_local"], cfg["num_classes"], cfg["dim"], cfg["seed"])
    x.requires_grad_(True)
    w.requires_grad_(True)
    valid = labels != -100
    local = torch.where(valid, torch.searchsorted(active, labels.clamp_min(0)), labels)
    assert torch.isin(labels[valid], active).all()
    settings = {k: v for k, v in cfg["settings"].items() if k not in ("negatives", "sparse_grad")}
    loss = reference.margin_softmax_loss(x, w[active], local, **settings)
    loss.backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_sampling_per_shard(world_size):
    # Each shard samples among its own classes; the loss is the margin softmax over the union of the
    # shards' active sets. count=0 leaves shards without positives empty (they contribute nothing). Top-9 of
    # 25 classes at world 3 (shards 9, 9, 7): the small shard offers all of its classes. 4 classes at world 3
    # leave the last shard without classes (2, 2, 0).
    # RandomNegatives(size=9) at 25 classes and 3 x world rows: min(9, len(shard)) classes per shard (all of
    # the 7-class shard at world 3).
    topk, rate, empty, big_k = TopKNegatives(4), RandomNegatives(rate=0.3), RandomNegatives(count=0), TopKNegatives(9)
    fixed = RandomNegatives(size=9)
    configs = [
        dict(n_local=4, num_classes=61, dim=6, seed=4, settings=dict(COSFACE, negatives=topk, sparse_grad=True)),
        dict(n_local=3, num_classes=50, dim=5, seed=5, settings=dict(ARCFACE, negatives=rate)),
        dict(n_local=2, num_classes=90, dim=4, seed=6, settings=dict(COSFACE, negatives=empty, sparse_grad=True)),
        dict(n_local=3, num_classes=25, dim=5, seed=9, settings=dict(COSFACE, negatives=big_k, sparse_grad=True)),
        dict(n_local=2, num_classes=4, dim=4, seed=10, settings=dict(ARCFACE, negatives=empty, sparse_grad=True)),
        dict(n_local=3, num_classes=25, dim=5, seed=11, settings=dict(COSFACE, negatives=fixed, sparse_grad=True)),
    ]
    per_rank = run_ranks(sharded_loss_and_grads, world_size, configs)
    for k, cfg in enumerate(configs):
        results = [r[k] for r in per_rank]
        active = torch.cat([r["active"] for r in results])
        assert torch.equal(active, torch.unique(active))  # shards are contiguous: the union stays sorted
        x, w, labels = global_problem(world_size, cfg["n_local"], cfg["num_classes"], cfg["dim"], cfg["seed"])
        valid = labels != -100
        for r in results:  # per-shard semantics: the shard's positives plus its own negatives
            start, stop = r["shard"]
            positives = torch.unique(labels[valid & (labels >= start) & (labels < stop)])
            mine = r["active"]
            assert torch.isin(positives, mine).all() and ((mine >= start) & (mine < stop)).all()
            negatives = cfg["settings"]["negatives"]
            if isinstance(negatives, TopKNegatives):
                k = min(negatives.k, stop - start - positives.numel())
                _, hard = reference.hardest_classes(x[valid], w[start:stop], k, exclude=positives - start)
                assert torch.equal(mine, torch.sort(torch.cat([positives, hard + start])).values)
            elif negatives is fixed:
                assert mine.numel() == min(9, stop - start)
            elif negatives is rate:
                assert mine.numel() == max(positives.numel(), math.ceil(0.3 * (stop - start)))
            else:
                assert torch.equal(mine, positives)
        # sparse_grad: the row-sparse gradient lands on the plain local rows (a DTensor has no sparse layout),
        # without rows on a shard with no active class; dense: on the DTensor. Every rank gets one.
        expected_type = ("Tensor", True) if cfg["settings"].get("sparse_grad") else ("DTensor", False)
        assert all(r["grad_type"] == expected_type for r in results)
        loss, grad_x, grad_w = sampled_reference(cfg, world_size, active)
        for r in results:
            torch.testing.assert_close(r["loss"], loss, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(torch.cat([r["grad_x"] for r in results]), grad_x, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(torch.cat([r["grad_w"] for r in results]), grad_w, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_mismatched_batch_sizes_raise_on_every_rank_quickly():
    results = run_ranks(mismatched_batch, 3, timeout_s=60)
    for message, seconds in results:
        assert "ranks disagree on local batch size: [4, 3, 3] (by rank)" in message
        assert seconds < 5.0


@pytest.mark.slow
def test_mismatched_margins_raise_on_every_rank():
    for message in run_ranks(mismatched_margin, 2, timeout_s=60):
        assert "ranks disagree on m2" in message


@pytest.mark.slow
def test_checkpoint_saved_at_world_4_loads_at_2_and_1(tmp_path):
    num_classes, dim, seed = 23, 5, 7
    shards = run_ranks(save_checkpoint, 4, str(tmp_path), num_classes, dim, seed)
    assert shards == [(s.start, s.stop) for s in partition(num_classes, 4)]
    index = read_index(str(tmp_path))
    assert index["num_classes"] == num_classes and index["world_size"] == 4 and len(index["shards"]) == 4
    losses = {ws: run_ranks(load_checkpoint_and_loss, ws, str(tmp_path), num_classes, dim, seed) for ws in (2, 4)}
    single = load_checkpoint_and_loss(0, 1, str(tmp_path), num_classes, dim, seed)
    for ws, per_rank in losses.items():
        for value in per_rank:
            assert value == pytest.approx(single, rel=1e-12), ws
    _, w, _ = global_problem(1, 1, num_classes, dim, seed)
    torch.testing.assert_close(load_sharded(str(tmp_path), range(0, num_classes))["weight"], w)


def test_checkpoint_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json is missing"):
        load_sharded(str(tmp_path), range(0, 3))
    save_sharded(str(tmp_path), {"weight": torch.zeros(3, 2)}, range(0, 3), 3)
    with pytest.raises(ValueError, match="has 3 classes, expected 4"):
        load_sharded(str(tmp_path), range(0, 3), num_classes=4)
    with pytest.raises(ValueError, match="outside the checkpoint"):
        load_sharded(str(tmp_path), range(2, 5))
    with pytest.raises(ValueError, match="has 2 rows but the shard"):
        save_sharded(str(tmp_path), {"weight": torch.zeros(2, 2)}, range(0, 3), 3)


@pytest.mark.slow
def test_kill_during_save_leaves_a_consistent_checkpoint(tmp_path):
    # A process saves versions 1, 2, 3, ... as fast as it can and is SIGKILLed at arbitrary points;
    # every time, the checkpoint on disk must load and hold one complete version.
    directory = str(tmp_path)
    save_sharded(directory, {"weight": torch.zeros(40, 3, dtype=torch.float64)}, range(0, 40), 40)
    ctx = multiprocessing.get_context("spawn")
    versions = []
    for delay in (0.0, 0.15, 0.4):
        proc = ctx.Process(target=save_forever, args=(directory, 40, 3), daemon=True)
        proc.start()
        # Wait for the saver's first complete checkpoint (start-up time varies with load), then kill it at
        # an arbitrary point of its save loop. Polls the index alone (replaced atomically): loading the rows
        # while the saver runs could race with its removal of the previous checkpoint's files.
        first, started = read_index(directory)["id"], time.monotonic()
        while read_index(directory)["id"] == first:
            assert proc.is_alive() and time.monotonic() - started < 120, "the saver never completed a checkpoint"
            time.sleep(0.05)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        rows = load_sharded(directory, range(0, 40), 40)["weight"]
        assert (rows == rows[0, 0]).all(), "a torn checkpoint"
        versions.append(rows[0, 0].item())
        save_sharded(directory, {"weight": torch.zeros(40, 3, dtype=torch.float64)}, range(0, 40), 40)
    assert min(versions) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("encoder_flag", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_torchrun_example_trains_and_checkpoints(tmp_path, encoder_flag):
    import re
    import subprocess
    import sys

    import torch.distributed.checkpoint as dcp

    from oclear_ext.examples.hybrid_parallel import make_encoder

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "oclear_ext.examples.hybrid_parallel", "--classes", "300", "--steps", "100", "--batch", "32",
           "--checkpoint", str(tmp_path), *encoder_flag]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", proc.stdout)]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0], proc.stdout
    # The DCP checkpoint of 2 ranks loads in one process (no process group) and holds the trained model: it
    # classifies a fresh batch of the example's synthetic data about as well as at the end of training.
    encoder = make_encoder(64, 128)
    classifier = ShardedMarginClassifier(300, 128, scale=32.0, margin=(1.0, 0.3, 0.0))
    state = {"encoder": encoder.state_dict(), "classifier": classifier.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path), no_dist=True)
    centres = torch.randn(300, 64, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(99)
    labels = torch.randint(0, 300, (256,), generator=g)
    with torch.no_grad():
        loss = classifier(encoder(centres[labels] + 0.5 * torch.randn(256, 64, generator=g)), labels).item()
    assert loss < 0.5 * losses[0], (loss, losses)

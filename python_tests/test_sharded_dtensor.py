"""The sharded head's weight as a DTensor: DCP re-shards it 4 -> 2 -> 1, the trainer's checkpoints and optimizers
work with it, reduction="none" gives each rank its rows with exact gradients, the rank check runs once per
configuration, and the head refuses a world it was not built for (gloo, CPU)."""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks
from dist_workers import (
    _head_and_optimizer,
    agreement_cache,
    dcp_reshard,
    fixed_batch,
    global_problem,
    per_row_losses_and_grads,
    train_steps,
    trainer_checkpoint_round_trip,
    world_checks,
)

from oclear_ext.distributed import partition
from oclear_ext.nn import MarginSoftmaxLoss, ShardedMarginClassifier
from oclear_ext.train.checkpoint import load_checkpoint

COSFACE = dict(scale=32.0, margin=(1.0, 0.0, 0.35))
ARCFACE = dict(scale=32.0, margin=(1.0, 0.5, 0.0))
RTOL, ATOL = 1e-10, 1e-12  # float64: the sharded results differ from one process's by summation order only


# ---- construction: the single-process head is unchanged; a distributed run that is expected but absent raises

def test_without_torch_distributed_the_weight_is_a_plain_full_parameter():
    clf = ShardedMarginClassifier(50, 8)
    assert type(clf.weight) is torch.nn.Parameter and clf.weight.shape == (50, 8)
    assert clf.local_weight is clf.weight and clf.trainable_weight is clf.weight
    assert list(clf.state_dict()) == ["weight"] and clf.shard == range(0, 50)


def test_a_process_group_or_world_size_without_torch_distributed_raises():
    with pytest.raises(RuntimeError, match="process_group was passed but torch.distributed is not initialised"):
        ShardedMarginClassifier(10, 4, process_group=object())
    with pytest.raises(RuntimeError, match="device_mesh was passed but torch.distributed is not initialised"):
        ShardedMarginClassifier(10, 4, device_mesh=object())
    with pytest.raises(ValueError, match=r"world_size=4 was expected, but the process group has 1 rank\(s\) "
                                         r"\(torch.distributed is not initialised"):
        ShardedMarginClassifier(10, 4, world_size=4)
    with pytest.raises(ValueError, match="world_size must be a positive int or None, got 0"):
        ShardedMarginClassifier(10, 4, world_size=0)
    with pytest.raises(ValueError, match=r"check_ranks must be one of \('once', 'always'\), got 'never'"):
        ShardedMarginClassifier(10, 4, check_ranks="never")


def test_a_torchrun_launch_without_init_process_group_raises(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 .* torch.distributed is not initialised, so every process "
                                           "would train its own full head"):
        ShardedMarginClassifier(10, 4)
    assert ShardedMarginClassifier(10, 4, world_size=1).weight.shape == (10, 4)  # the explicit opt-out


@pytest.mark.slow
def test_forward_refuses_a_world_other_than_constructions(tmp_path):
    for rank, (after_destroy, after_init, dtensor) in enumerate(run_ranks(world_checks, 2, str(tmp_path / "store"))):
        assert after_destroy == (f"ShardedMarginClassifier: built for world size 2, rank {rank}, but forward runs "
                                 "at world size 1, rank 0; build the classifier after init_process_group, in the "
                                 "process group it runs in")
        assert after_init.startswith("ShardedMarginClassifier: built for world size 1, rank 0 (torch.distributed "
                                     f"was not initialised then), but forward runs at world size 2, rank {rank}")
        assert not dtensor


# ---- DCP: save at world 4, load at 2 (a process group of ranks 0 and 1) and at 1 (no process group at all)

@pytest.mark.slow
def test_dcp_reshards_the_weight_from_world_4_to_2_to_1(tmp_path):
    import torch.distributed.checkpoint as dcp

    num_classes, dim, seed = 23, 5, 7  # chunks of 6, 6, 6, 5 at world 4; 12, 11 at world 2
    directory = str(tmp_path / "dcp")
    per_rank = run_ranks(dcp_reshard, 4, directory, num_classes, dim, seed)
    assert [saved[0] for saved, _ in per_rank] == [(r.start, r.stop) for r in partition(num_classes, 4)]
    at_two = [loaded for _, loaded in per_rank[:2]]
    assert [loaded[0] for loaded in at_two] == [(r.start, r.stop) for r in partition(num_classes, 2)]
    _, w, _ = global_problem(1, 1, num_classes, dim, seed)
    assert torch.equal(torch.cat([rows for _, rows, _, _ in at_two]), w)  # max abs difference 0
    assert torch.equal(torch.cat([plain for _, _, _, plain in at_two]), w)  # load_state_dict of a plain (C, D)
    at_one = ShardedMarginClassifier(num_classes, dim, dtype=torch.float64, scale=16.0)
    dcp.load(at_one.state_dict(), checkpoint_id=directory, no_dist=True)
    assert torch.equal(at_one.weight.detach(), w)
    x, labels = fixed_batch(num_classes, dim, seed)
    reference = MarginSoftmaxLoss(num_classes, dim, dtype=torch.float64, scale=16.0)
    with torch.no_grad():
        reference.weight.copy_(w)
    losses = [saved[1] for saved, _ in per_rank] + [loaded[2] for loaded in at_two] + [at_one(x, labels).item()]
    assert losses == pytest.approx([reference(x, labels).item()] * 7, rel=1e-12)


# ---- the trainer's checkpoint and optimizers with a DTensor weight (dense) and with row-sparse local rows

@pytest.mark.slow
def test_trainer_checkpoint_and_optimizers_with_the_dtensor_weight(tmp_path):
    num_classes, dim, seed = 21, 6, 11
    run_dirs = {"dense": str(tmp_path / "dense"), "sparse": str(tmp_path / "sparse")}
    per_rank = run_ranks(trainer_checkpoint_round_trip, 2, run_dirs, num_classes, dim, seed)
    x, w, labels = global_problem(2, 4, num_classes, dim, seed)
    for mode in run_dirs:
        results = [r[mode] for r in per_rank]
        for r in results:
            assert r["losses"][0] == results[0]["losses"][0]  # the global loss, on every rank
            trained, restored = r["state"]["trained"], r["state"]["restored"]
            assert torch.equal(restored["weight"], trained["weight"])
            assert torch.equal(restored["exp_avg"], trained["exp_avg"])
            # Dense AdamW keeps DTensor state (restored as DTensors); the row-sparse one plain rows.
            assert trained["exp_avg_is_dtensor"] == restored["exp_avg_is_dtensor"] == (mode == "dense")
            assert r["losses"][2] == r["losses"][3] and torch.equal(*r["after"])  # the resumed step is the same
        # The same checkpoint at world 1, without torch.distributed.
        clf, opt = _head_and_optimizer(mode, num_classes, dim)
        model = torch.nn.Linear(2, 2)
        load_checkpoint(run_dirs[mode], model=model, classifier=clf, optimizer=torch.optim.SGD(model.parameters()),
                        classifier_optimizer=opt, schedulers=[], generators={}, device=torch.device("cpu"))
        assert torch.equal(clf.weight.detach(), torch.cat([r["state"]["trained"]["weight"] for r in results]))
        exp_avg = torch.cat([r["state"]["trained"]["exp_avg"] for r in results])
        assert torch.equal(opt.state[clf.weight]["exp_avg"], exp_avg)
    # Dense: torch.optim.AdamW stepping on the DTensor equals AdamW on one process's full weight.
    clf, opt = _head_and_optimizer("dense", num_classes, dim)
    with torch.no_grad():
        clf.weight.copy_(w)
    losses = train_steps(clf, opt, x, labels, 2)
    assert per_rank[0]["dense"]["losses"][:2] == pytest.approx(losses, rel=1e-12)
    torch.testing.assert_close(torch.cat([r["dense"]["state"]["trained"]["weight"] for r in per_rank]),
                               clf.weight.detach(), rtol=RTOL, atol=ATOL)


# ---- reduction="none": each rank's own rows, exact gradients of any function of them

@pytest.mark.slow
def test_reduction_none_gives_each_rank_its_rows_with_exact_gradients():
    world = 3
    cfg = dict(n_local=4, num_classes=37, dim=6, seed=3, settings=ARCFACE)  # chunks 13, 13, 11; ignored rows
    per_rank = run_ranks(per_row_losses_and_grads, world, cfg)
    x, w, labels = global_problem(world, cfg["n_local"], cfg["num_classes"], cfg["dim"], cfg["seed"])
    x.requires_grad_(True)
    single = MarginSoftmaxLoss(cfg["num_classes"], cfg["dim"], dtype=torch.float64, reduction="none", **ARCFACE)
    with torch.no_grad():
        single.weight.copy_(w)
    rows = single(x, labels)
    # Every rank backpropagated the mean of its own rows: the objective is the sum of those means.
    sum(block.mean() for block in rows.split(cfg["n_local"])).backward()
    for r, block in zip(per_rank, rows.split(cfg["n_local"])):
        assert r["rows"].shape == (cfg["n_local"],)
        torch.testing.assert_close(r["rows"], block.detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in per_rank]), x.grad, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.cat([r["grad_w"] for r in per_rank]), single.weight.grad, rtol=RTOL, atol=ATOL)


# ---- the rank-agreement check: once per configuration, and still an error on every rank

@pytest.mark.slow
def test_rank_check_runs_once_per_configuration_and_still_raises_on_every_rank():
    for counts, diverged, alone, debug_checks in run_ranks(agreement_cache, 2):
        assert counts == [1, 1, 1, 2, 2, 2, 3]  # n = 4, 4, 4, 3, 3, 4 (all ranks), then a new scale
        assert "ranks disagree on local batch size: [5, 6] (by rank)" in diverged
        assert "ranks disagree on local batch size: [4, 3] (by rank)" in alone
        assert debug_checks == 1  # check_ranks="always" checked the first call, raised on the second

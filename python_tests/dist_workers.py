"""Functions that run on each rank (importable by spawned processes)."""

from __future__ import annotations

import time

import torch

from oclear_ext.distributed import load_sharded, save_sharded
from oclear_ext.nn import ShardedMarginClassifier


def global_problem(world_size: int, n_local: int, num_classes: int, dim: int, seed: int):
    """The same global batch, labels (some ignored) and class weights on every rank (and in the parent)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world_size * n_local, dim, generator=g, dtype=torch.float64)
    w = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (world_size * n_local,), generator=g)
    labels[::5] = -100
    return x, w, labels


def sharded_loss_and_grads(rank, world_size, configs):
    """For each config: this rank's loss, its embeddings' gradient, its shard and the shard's gradient."""
    out = []
    for cfg in configs:
        x, w, labels = global_problem(world_size, cfg["n_local"], cfg["num_classes"], cfg["dim"], cfg["seed"])
        rows = slice(rank * cfg["n_local"], (rank + 1) * cfg["n_local"])
        clf = ShardedMarginClassifier(cfg["num_classes"], cfg["dim"], dtype=torch.float64, **cfg["settings"])
        with torch.no_grad():
            clf.weight.copy_(w[clf.shard.start : clf.shard.stop])
        local_x = x[rows].clone().requires_grad_(True)
        loss = clf(local_x, labels[rows])
        loss.backward()
        grad_w = clf.weight.grad
        if grad_w is not None and grad_w.is_sparse:
            grad_w = grad_w.to_dense()
        elif grad_w is None:  # a shard with no active class under sampling
            grad_w = torch.zeros_like(clf.weight)
        out.append({"loss": loss.detach(), "grad_x": local_x.grad, "shard": (clf.shard.start, clf.shard.stop),
                    "grad_w": grad_w, "active": clf.active_classes})
    return out


def mismatched_batch(rank, world_size):
    """Rank 0 brings one row more than the others: every rank must raise, not hang."""
    clf = ShardedMarginClassifier(20, 4)
    n = 3 + (rank == 0)
    start = time.monotonic()
    try:
        clf(torch.randn(n, 4), torch.zeros(n, dtype=torch.long))
    except ValueError as err:
        return str(err), time.monotonic() - start
    return "no error", time.monotonic() - start


def mismatched_margin(rank, world_size):
    clf = ShardedMarginClassifier(20, 4, margin=(1.0, 0.5 if rank == 1 else 0.0, 0.0))
    try:
        clf(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
    except ValueError as err:
        return str(err)
    return "no error"


def save_checkpoint(rank, world_size, directory, num_classes, dim, seed):
    _, w, _ = global_problem(1, 1, num_classes, dim, seed)
    clf = ShardedMarginClassifier(num_classes, dim, dtype=torch.float64)
    with torch.no_grad():
        clf.weight.copy_(w[clf.shard.start : clf.shard.stop])
    save_sharded(directory, {"weight": clf.weight, "momentum": 2 * clf.weight}, clf.shard, num_classes)
    return clf.shard.start, clf.shard.stop


def load_checkpoint_and_loss(rank, world_size, directory, num_classes, dim, seed):
    # The same 12-row global batch at every world size (12 divides by 1, 2, 3 and 4).
    x, _, labels = global_problem(1, 12, num_classes, dim, seed + 1)
    n_local = 12 // world_size
    clf = ShardedMarginClassifier(num_classes, dim, dtype=torch.float64)
    rows = load_sharded(directory, clf.shard, num_classes)
    with torch.no_grad():
        clf.weight.copy_(rows["weight"])
    torch.testing.assert_close(rows["momentum"], 2 * rows["weight"])
    local = slice(rank * n_local, (rank + 1) * n_local)
    return clf(x[local], labels[local]).item()


def save_forever(directory, num_classes, dim):
    """Saves checkpoints whose rows all equal the version number k = 1, 2, ... until killed."""
    clf = ShardedMarginClassifier(num_classes, dim, dtype=torch.float64)
    k = 0
    while True:
        k += 1
        save_sharded(directory, {"weight": torch.full_like(clf.weight, float(k))}, clf.shard, num_classes)

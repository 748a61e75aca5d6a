"""Functions that run on each rank (importable by spawned processes)."""

from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist

from oclear_ext._ops.margin_softmax import MarginSettings
from oclear_ext.distributed import load_sharded, save_sharded
from oclear_ext.distributed.dtensor import is_dtensor, local_rows
from oclear_ext.nn import ShardedMarginClassifier


def set_rows(clf: ShardedMarginClassifier, w: torch.Tensor) -> None:
    """Gives the classifier this rank's rows of the full (C, D) weight `w`."""
    with torch.no_grad():
        local_rows(clf.weight).copy_(w[clf.shard.start : clf.shard.stop])


def shard_grad(clf: ShardedMarginClassifier) -> torch.Tensor:
    """This rank's (len(shard), D) gradient, dense, wherever it landed (zeros if no class of the shard took part)."""
    grad = clf.trainable_weight.grad
    if grad is None:
        return torch.zeros_like(clf.local_weight)
    grad = local_rows(grad)
    return grad.to_dense() if grad.is_sparse else grad


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
        set_rows(clf, w)
        local_x = x[rows].clone().requires_grad_(True)
        loss = clf(local_x, labels[rows])
        loss.backward()
        grad = clf.trainable_weight.grad
        out.append({"loss": loss.detach(), "grad_x": local_x.grad, "shard": (clf.shard.start, clf.shard.stop),
                    "grad_w": shard_grad(clf), "active": clf.active_classes,
                    "grad_type": None if grad is None else (type(grad).__name__, grad.is_sparse),
                    "weight_is_dtensor": is_dtensor(clf.weight)})
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
    set_rows(clf, w)
    save_sharded(directory, {"weight": clf.local_weight, "momentum": 2 * clf.local_weight}, clf.shard, num_classes)
    return clf.shard.start, clf.shard.stop


def load_checkpoint_and_loss(rank, world_size, directory, num_classes, dim, seed):
    # The same 12-row global batch at every world size (12 divides by 1, 2, 3 and 4).
    x, _, labels = global_problem(1, 12, num_classes, dim, seed + 1)
    n_local = 12 // world_size
    clf = ShardedMarginClassifier(num_classes, dim, dtype=torch.float64)
    rows = load_sharded(directory, clf.shard, num_classes)
    with torch.no_grad():
        clf.local_weight.copy_(rows["weight"])
    torch.testing.assert_close(rows["momentum"], 2 * rows["weight"])
    local = slice(rank * n_local, (rank + 1) * n_local)
    return clf(x[local], labels[local]).item()


def save_forever(directory, num_classes, dim):
    """Saves checkpoints whose rows all equal the version number k = 1, 2, ... until killed."""
    clf = ShardedMarginClassifier(num_classes, dim, dtype=torch.float64)
    k = 0
    while True:
        k += 1
        save_sharded(directory, {"weight": torch.full_like(clf.local_weight, float(k))}, clf.shard, num_classes)


# ---- DTensor weight: DCP resharding, reduction="none", the agreement cache, world checks (test_sharded_dtensor.py)

def fixed_batch(num_classes: int, dim: int, seed: int, rows: int = 12):
    """The same `rows`-row global batch at every world size (12 divides by 1, 2, 3 and 4)."""
    x, _, labels = global_problem(1, rows, num_classes, dim, seed + 1)
    return x, labels


def own_rows(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    n = t.shape[0] // world_size
    return t[rank * n : (rank + 1) * n]


def _loss_of_fixed_batch(clf, rank: int, world_size: int, seed: int) -> float:
    x, labels = fixed_batch(clf.num_classes, clf.embedding_dim, seed)
    return clf(own_rows(x, rank, world_size), own_rows(labels, rank, world_size)).item()


def dcp_reshard(rank, world_size, directory, num_classes, dim, seed):
    """Saves the classifier's state_dict with torch.distributed.checkpoint at this world size (4), then ranks 0
    and 1 load it, as a world of 2 (a process group of their own), into a fresh classifier (other initial
    weights). Returns (shard at 4, loss at 4) and, on ranks 0 and 1, (shard at 2, loaded local rows, loss at 2,
    local rows after load_state_dict of a plain (C, D) tensor)."""
    import torch.distributed.checkpoint as dcp

    _, w, _ = global_problem(1, 1, num_classes, dim, seed)
    clf = ShardedMarginClassifier(num_classes, dim, dtype=torch.float64, scale=16.0)
    set_rows(clf, w)
    dcp.save(clf.state_dict(), checkpoint_id=directory)
    saved = ((clf.shard.start, clf.shard.stop), _loss_of_fixed_batch(clf, rank, world_size, seed))
    pair = dist.new_group([0, 1])  # every rank takes part in creating it
    if rank > 1:
        return saved, None
    torch.manual_seed(1000 + rank)
    fresh = ShardedMarginClassifier(num_classes, dim, dtype=torch.float64, scale=16.0, process_group=pair)
    state = fresh.state_dict()
    assert is_dtensor(state["weight"]) and tuple(state["weight"].shape) == (num_classes, dim)
    dcp.load(state, checkpoint_id=directory, process_group=pair)
    plain = ShardedMarginClassifier(num_classes, dim, dtype=torch.float64, process_group=pair)
    plain.load_state_dict({"weight": w})  # a single-process (C, D) weight: this rank keeps its rows
    loaded = ((fresh.shard.start, fresh.shard.stop), fresh.local_weight.detach().clone(),
              _loss_of_fixed_batch(fresh, rank, 2, seed), plain.local_weight.detach().clone())
    return saved, loaded


def per_row_losses_and_grads(rank, world_size, cfg):
    """reduction="none": this rank's per-row losses, and the gradients of the mean of them."""
    x, w, labels = global_problem(world_size, cfg["n_local"], cfg["num_classes"], cfg["dim"], cfg["seed"])
    clf = ShardedMarginClassifier(cfg["num_classes"], cfg["dim"], dtype=torch.float64, reduction="none",
                                  **cfg["settings"])
    set_rows(clf, w)
    local_x = own_rows(x, rank, world_size).clone().requires_grad_(True)
    rows = clf(local_x, own_rows(labels, rank, world_size))
    rows.mean().backward()
    return {"rows": rows.detach(), "grad_x": local_x.grad, "grad_w": shard_grad(clf)}


def _error_of(fn) -> str:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return "no error"


def agreement_cache(rank, world_size):
    """The rank check's collective runs once per configuration; disagreements still raise on every rank."""
    dim = 4
    clf = ShardedMarginClassifier(20, dim)
    calls = lambda n: clf(torch.randn(n, dim), torch.zeros(n, dtype=torch.long))  # noqa: E731
    counts = []
    for n in (4, 4, 4, 3, 3, 4):  # every rank changes n at the same steps
        calls(n)
        counts.append(clf._agreement.collective_checks)
    clf.settings = MarginSettings(scale=32.0)  # a new setting on every rank: checked again
    calls(4)
    counts.append(clf._agreement.collective_checks)
    # Ranks moving to configurations none has agreed on before, differently: every rank checks and raises.
    diverged = _error_of(lambda: calls(5 + rank))
    # check_ranks="always": also a rank that alone leaves an agreed configuration is caught, on every rank.
    debug = ShardedMarginClassifier(20, dim, check_ranks="always")
    debug(torch.randn(4, dim), torch.zeros(4, dtype=torch.long))
    n = 3 if rank == world_size - 1 else 4
    alone = _error_of(lambda: debug(torch.randn(n, dim), torch.zeros(n, dtype=torch.long)))
    return counts, diverged, alone, debug._agreement.collective_checks


def world_checks(rank, world_size, store_file):
    """forward refuses a world other than construction's, both ways round."""
    x, labels = torch.randn(3, 4), torch.zeros(3, dtype=torch.long)
    built_in_group = ShardedMarginClassifier(20, 4)
    dist.destroy_process_group()
    try:
        built_in_group(x, labels)
        after_destroy = "no error"
    except RuntimeError as err:
        after_destroy = str(err)
    built_before_init = ShardedMarginClassifier(20, 4)  # no torch.distributed, no WORLD_SIZE: one process
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=30))
    try:
        built_before_init(x, labels)
        after_init = "no error"
    except RuntimeError as err:
        after_init = str(err)
    return after_destroy, after_init, is_dtensor(built_before_init.weight)


def _head_and_optimizer(mode: str, num_classes: int, dim: int):
    """A classifier and its optimizer as the trainer builds them: dense AdamW on the DTensor weight, or
    RowSparseAdamW on the plain local rows (top-k negatives, row-sparse gradients)."""
    from oclear_ext import TopKNegatives
    from oclear_ext.optim import RowSparseAdamW

    negatives = TopKNegatives(3) if mode == "sparse" else None
    clf = ShardedMarginClassifier(num_classes, dim, dtype=torch.float64, scale=16.0, negatives=negatives,
                                  sparse_grad=negatives is not None)
    opt_type = RowSparseAdamW if negatives is not None else torch.optim.AdamW
    return clf, opt_type([clf.trainable_weight], lr=0.05, weight_decay=0.01)


def train_steps(clf, opt, x, labels, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = clf(x, labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def trainer_checkpoint_round_trip(rank, world_size, run_dirs, num_classes, dim, seed):
    """Per mode: 2 steps, the trainer's save_checkpoint, a fresh head + optimizer restored from it at this world
    size, and one more step on both. Returns the rows and optimizer state to compare."""
    from oclear_ext.train.checkpoint import load_checkpoint, save_checkpoint

    x, w, labels = global_problem(world_size, 4, num_classes, dim, seed)
    x, labels = own_rows(x, rank, world_size), own_rows(labels, rank, world_size)
    out = {}
    for mode, run_dir in run_dirs.items():
        parts = []
        for _ in range(2):  # the trained one, then the restored one
            clf, opt = _head_and_optimizer(mode, num_classes, dim)
            model = torch.nn.Linear(2, 2)
            parts.append(dict(model=model, classifier=clf, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                              classifier_optimizer=opt, schedulers=[], generators={}))
        trained, restored = parts
        set_rows(trained["classifier"], w)
        losses = train_steps(trained["classifier"], trained["classifier_optimizer"], x, labels, 2)
        save_checkpoint(run_dir, 2, position={"step": 2}, config={}, **trained)
        load_checkpoint(run_dir, device=torch.device("cpu"), **restored)
        state = {}
        for name, p in (("trained", trained), ("restored", restored)):
            clf, opt = p["classifier"], p["classifier_optimizer"]
            exp_avg = opt.state[clf.trainable_weight]["exp_avg"]
            state[name] = {"weight": clf.local_weight.detach().clone(), "exp_avg": local_rows(exp_avg).clone(),
                           "exp_avg_is_dtensor": is_dtensor(exp_avg)}
        for p in (trained, restored):
            losses.append(train_steps(p["classifier"], p["classifier_optimizer"], x, labels, 1)[0])
        out[mode] = {"losses": losses, "state": state, "after": [p["classifier"].local_weight.detach().clone()
                                                                  for p in (trained, restored)]}
    return out


# ---- FSDP2 encoders beside the class-sharded head (test_fsdp.py)

def make_encoder(in_dim: int, dim: int) -> torch.nn.Module:
    """Three layers, float64; the same initial weights on every rank and in the parent (seed 0)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(in_dim, 16), torch.nn.Tanh(), torch.nn.Linear(16, dim)).double()


def encoder_problem(world_size: int, cfg: dict):
    """(inputs (P n, in_dim), class weights (C, D), labels (P n,)) of the global batch."""
    x, w, labels = global_problem(world_size, cfg["n_local"], cfg["num_classes"], cfg["in_dim"], cfg["seed"])
    w = torch.randn(cfg["num_classes"], cfg["dim"], generator=torch.Generator().manual_seed(cfg["seed"]),
                    dtype=torch.float64)
    return x, w, labels


class EncoderAndHead(torch.nn.Module):
    def __init__(self, encoder, head):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x, labels):
        return self.head(self.encoder(x), labels)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if is_dtensor(t) else t


def encoder_step(rank, world_size, cfg):
    """One SGD step of encoder + head per way of distributing the encoder: DDP summing gradients, fully_shard
    of the encoder alone, fully_shard of a parent module with the head's weight ignored. Returns per way the
    loss, the encoder's full gradients and updated parameters, the head's updated rows and the next loss."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from oclear_ext.distributed import ddp_sum_gradients, fsdp_sum_gradients

    x, w, labels = encoder_problem(world_size, cfg)
    x, labels = own_rows(x, rank, world_size), own_rows(labels, rank, world_size)
    out = {}
    for way in ("ddp", "fsdp", "fsdp_parent"):
        encoder = make_encoder(cfg["in_dim"], cfg["dim"])
        head = ShardedMarginClassifier(cfg["num_classes"], cfg["dim"], dtype=torch.float64, **cfg["settings"])
        set_rows(head, w)
        if way == "ddp":
            model = EncoderAndHead(ddp_sum_gradients(DistributedDataParallel(encoder)), head)
        elif way == "fsdp":
            model = EncoderAndHead(fsdp_sum_gradients(fully_shard(encoder)), head)
        else:
            model = fsdp_sum_gradients(fully_shard(EncoderAndHead(encoder, head), ignored_params={head.weight}))
        opt = torch.optim.SGD([{"params": encoder.parameters()}, {"params": [head.trainable_weight]}], lr=0.5)
        loss = model(x, labels)
        loss.backward()
        grads = [_full(p.grad).clone() for p in encoder.parameters()]
        opt.step()
        params = list(encoder.parameters())
        out[way] = {"loss": loss.item(), "grads": grads, "params": [_full(p.detach()).clone() for p in params],
                    "head": head.local_weight.detach().clone(), "sharded": [is_dtensor(p) for p in params]}
        out[way]["next_loss"] = model(x, labels).item()  # (FSDP2 leaves a root module unsharded after forward)
    return out

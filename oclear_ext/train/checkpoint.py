"""Training checkpoints: model + sharded classifier + optimizers + schedulers + RNG, atomic, re-shardable.

Layout of <run>/checkpoints/step-<step, 8 digits>/ (e.g. step-00001200/):
    state.pt              model, model optimizer, schedulers, the classifier optimizer's non-row state and
                          param groups, trainer position (step, epoch, batch in epoch), config (rank 0)
    rank-<r>.pt           RNG states of rank r (torch, CUDA, the negative sampler's generator)
    classifier/           oclear_ext.distributed.save_sharded: the class weights and every per-row optimizer
                          tensor (momentum, moments, last touch), one file per rank, re-shardable on load
The folder is written as step-<step>.tmp and renamed into place, and <run>/checkpoints/latest (the
name of the newest complete checkpoint) is replaced atomically after it: a crash mid-save leaves the
previous checkpoint and `latest` intact.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ..distributed import load_sharded, save_sharded
from ..distributed.dtensor import like_rows_of, local_rows
from ..distributed.sharded_softmax import world_and_rank

LATEST = "latest"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _split_row_state(state: dict, rows: int) -> tuple[dict, dict]:
    """(per-row tensors: first dim = the shard's rows, everything else) of one parameter's optimizer state."""
    row, other = {}, {}
    for key, value in state.items():
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == rows:
            row[key] = value
        else:
            other[key] = value
    return row, other


def _classifier_param(classifier, classifier_optimizer) -> Tensor:
    """The classifier's weight, checked to be the one parameter its optimizer holds: the checkpoint stores
    that parameter's per-row state sharded by class, and every other optimizer state whole. The weight the
    optimizer steps on is classifier.trainable_weight: the (DTensor) weight, or its plain local rows when
    the gradient is row-sparse in a process group."""
    params = [p for group in classifier_optimizer.param_groups for p in group["params"]]
    if len(params) != 1 or params[0] is not classifier.trainable_weight:
        raise ValueError(f"checkpoint: the classifier optimizer must hold exactly the classifier weight "
                         f"(its per-row state is saved sharded by class), got {len(params)} parameter(s)"
                         + ("" if len(params) != 1 else " that is not classifier.trainable_weight"))
    return classifier.trainable_weight


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    out = {"torch": torch.get_rng_state(), "generators": {k: g.get_state() for k, g in generators.items()}}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for key, g in generators.items():
        if key in state["generators"]:
            g.set_state(state["generators"][key])


def save_checkpoint(run_dir: str | Path, step: int, *, model, classifier, optimizer, classifier_optimizer,
                    schedulers: list, position: dict, config: dict, generators: dict[str, torch.Generator]) -> Path:
    """Writes checkpoint `step` (collective: every rank calls it). Returns its folder."""
    _, rank = world_and_rank()
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step-{step:08d}", root / f"step-{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    weight = _classifier_param(classifier, classifier_optimizer)
    # This rank's rows as plain tensors: a DTensor weight's optimizer state is DTensors of the same layout.
    state = {k: local_rows(v) for k, v in classifier_optimizer.state.get(weight, {}).items()}
    row_state, other_state = _split_row_state(state, len(classifier.shard))
    rows = {"weight": local_rows(weight.detach()), **{f"optim.{k}": v for k, v in row_state.items()}}
    save_sharded(str(tmp / "classifier"), rows, classifier.shard, classifier.num_classes)
    torch.save(rng_state(generators), tmp / f"rank-{rank}.pt")
    if rank == 0:
        torch.save({
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedulers": [s.state_dict() for s in schedulers],
            "classifier_optimizer": {"state": other_state,
                                     "param_groups": classifier_optimizer.state_dict()["param_groups"]},
            "position": position,
            "config": config,
        }, tmp / "state.pt")
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
    _barrier()
    return final


def latest_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run / checkpoints folder resolved through its `latest` pointer."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / "state.pt").is_file():
            return candidate
        if (candidate / LATEST).is_file():
            return candidate / (candidate / LATEST).read_text().strip()
    raise FileNotFoundError(f"no checkpoint at {path} (expected state.pt, or a checkpoints/latest pointer)")


def load_checkpoint(path: str | Path, *, model, classifier, optimizer, classifier_optimizer, schedulers: list,
                    generators: dict[str, torch.Generator], device: torch.device, same: dict | None = None) -> dict:
    """Restores everything save_checkpoint wrote, at any world size (the classifier re-shards); returns the
    trainer position. RNG states are restored when the checkpoint has this rank's file. `same`: settings
    that must equal the checkpoint's (a different optimizer cannot take over another's state)."""
    folder = latest_checkpoint(path)
    _, rank = world_and_rank()
    weight = _classifier_param(classifier, classifier_optimizer)
    # weights_only: a checkpoint holds tensors, numbers, strings and containers only; loading runs no pickled code
    state = torch.load(folder / "state.pt", map_location=device, weights_only=True)
    for key, value in (same or {}).items():
        saved = state["config"].get(key)
        if saved != value:
            raise ValueError(f"resume: the checkpoint {folder} was trained with {key} = {saved!r}, "
                             f"this run asks for {value!r}; resume with the same {key}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for scheduler, saved in zip(schedulers, state["schedulers"]):
        scheduler.load_state_dict(saved)
    rows = load_sharded(str(folder / "classifier"), classifier.shard, classifier.num_classes)
    with torch.no_grad():
        local_rows(weight).copy_(rows.pop("weight"))
    saved_opt = state["classifier_optimizer"]
    param_state = dict(saved_opt["state"])
    param_state.update({k.removeprefix("optim."): like_rows_of(v.to(device), weight) for k, v in rows.items()})
    classifier_optimizer.load_state_dict({"state": {0: param_state} if param_state else {},
                                          "param_groups": saved_opt["param_groups"]})
    rank_file = folder / f"rank-{rank}.pt"
    if rank_file.is_file():
        set_rng_state(torch.load(rank_file, weights_only=True), generators)
    return state["position"]

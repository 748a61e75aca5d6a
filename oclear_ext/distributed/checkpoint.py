"""Sharded checkpoints of row-sharded tensors (class weights and their optimizer state).

Layout of a checkpoint directory:
    index.json                          {"num_classes", "world_size", "tensors": {name: {"dtype", "row_shape"}},
                                         "shards": [{"start", "stop", "file"}, ...], "id"}
    shard-<id>-<rank>-of-<world>.pt     {name: tensor (stop - start, ...)} for one rank's rows

Writing is atomic as a whole: every file goes to a temporary name and is renamed into place; the shard
files carry a fresh checkpoint id, and index.json (which names them) is replaced last, after a barrier.
A crash at any point leaves the previous index and the files it names intact. Files of older checkpoints
are removed only after the new index is in place. Loading re-shards: any world size can read any
checkpoint, each rank reading only the files that overlap its rows.

The classifier's weight alone also saves and re-shards with torch.distributed.checkpoint (it is a DTensor);
this format remains for what DCP cannot re-shard: the per-row state of the row-sparse optimizers, which
step on the plain local rows (a DTensor cannot carry a row-sparse gradient), saved beside the weight by
oclear_ext.train's checkpoints.
"""

from __future__ import annotations

import json
import os
import uuid

import torch
import torch.distributed as dist
from torch import Tensor

from .sharded_softmax import world_and_rank

INDEX = "index.json"


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _broadcast_str(value: str, group) -> str:
    if world_and_rank(group)[0] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return box[0]


def _barrier(group) -> None:
    if world_and_rank(group)[0] > 1:
        dist.barrier(group=group)


def save_sharded(directory: str, rows: dict[str, Tensor], shard: range, num_classes: int, group=None) -> None:
    """Collective: every rank of `group` saves its rows [shard.start, shard.stop) of each named tensor."""
    world, rank = world_and_rank(group)
    for name, t in rows.items():
        if t.shape[0] != len(shard):
            raise ValueError(f"save_sharded: {name} has {t.shape[0]} rows but the shard {shard} holds {len(shard)}")
    os.makedirs(directory, exist_ok=True)
    ckpt_id = _broadcast_str(uuid.uuid4().hex[:12], group)
    filename = f"shard-{ckpt_id}-{rank:05d}-of-{world:05d}.pt"
    payload = {name: t.detach().cpu().contiguous() for name, t in rows.items()}
    _atomic_write(os.path.join(directory, filename), lambda p: torch.save(payload, p))

    # Rank 0 learns every shard's range and file, then publishes the index once all shards are on disk.
    entry = {"start": shard.start, "stop": shard.stop, "file": filename}
    entries = [entry] * world
    if world > 1:
        dist.all_gather_object(entries, entry, group=group)
    _barrier(group)
    if rank == 0:
        index = {
            "id": ckpt_id,
            "num_classes": num_classes,
            "world_size": world,
            "tensors": {name: {"dtype": str(t.dtype).removeprefix("torch."), "row_shape": list(t.shape[1:])}
                        for name, t in payload.items()},
            "shards": sorted(entries, key=lambda e: e["start"]),
        }
        _atomic_write(os.path.join(directory, INDEX), lambda p: open(p, "w").write(json.dumps(index, indent=1)))
        keep = {e["file"] for e in entries} | {INDEX}
        for name in os.listdir(directory):
            if name.startswith("shard-") and name not in keep and ".tmp-" not in name:
                os.remove(os.path.join(directory, name))
    _barrier(group)


def read_index(directory: str) -> dict:
    path = os.path.join(directory, INDEX)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_sharded: no checkpoint in {directory} ({INDEX} is missing)")
    with open(path) as f:
        return json.load(f)


def load_sharded(directory: str, shard: range, num_classes: int | None = None) -> dict[str, Tensor]:
    """This rank's rows [shard.start, shard.stop) of every tensor in the checkpoint, whatever world size saved it."""
    index = read_index(directory)
    if num_classes is not None and index["num_classes"] != num_classes:
        raise ValueError(f"load_sharded: the checkpoint in {directory} has {index['num_classes']} classes, "
                         f"expected {num_classes}")
    if shard.start < 0 or shard.stop > index["num_classes"]:
        raise ValueError(f"load_sharded: rows {shard} are outside the checkpoint's {index['num_classes']} classes")
    pieces: dict[str, list[Tensor]] = {name: [] for name in index["tensors"]}
    covered = shard.start
    for entry in index["shards"]:  # sorted by start, contiguous
        lo, hi = max(entry["start"], shard.start), min(entry["stop"], shard.stop)
        if lo >= hi:
            continue
        data = torch.load(os.path.join(directory, entry["file"]), map_location="cpu", weights_only=True)
        for name in pieces:
            pieces[name].append(data[name][lo - entry["start"] : hi - entry["start"]])
        covered = hi
    if covered != shard.stop and len(shard) > 0:
        raise ValueError(f"load_sharded: the checkpoint in {directory} does not cover rows {shard}")
    if len(shard) == 0:  # an empty shard (partition leaves trailing ones empty): no file overlaps it
        return {name: torch.empty(0, *meta["row_shape"], dtype=getattr(torch, meta["dtype"]))
                for name, meta in index["tensors"].items()}
    return {name: torch.cat(parts) for name, parts in pieces.items()}

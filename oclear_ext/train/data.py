"""Where training and validation data come from: a manifest path, or the built-in emoji set."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

BUILTIN_EMOJI = "builtin:emoji"
# Composed queries on the built-in emoji (oclear_ext.data.composed): reference + modifier -> target. Training
# reads its train split, validation and evaluation its held-out split; "builtin:emoji-composed:val" names the
# validation split (groups of the training side, for choosing settings without touching held-out classes).
BUILTIN_EMOJI_COMPOSED = "builtin:emoji-composed"
# Training on the built-in emoji: two vendors' images as queries, google image + text as docs, training
# classes only. Validation: the held-out classes with the evaluation protocol (twitter -> google + text).
TRAIN_QUERY_VENDORS = ("twitter", "openmoji")


def resolve_manifest(spec: str, split: str, work_dir: Path, rank: int = 0) -> Path:
    """A manifest path for `spec` (a path, or builtin:emoji[-composed] materialised under work_dir on rank 0)."""
    if spec == BUILTIN_EMOJI_COMPOSED or spec.startswith(BUILTIN_EMOJI_COMPOSED + ":"):
        return _composed(spec, split, Path(work_dir), rank)
    if spec != BUILTIN_EMOJI:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"manifest {spec} does not exist")
        return path
    from ..data.emoji import builtin_manifest

    folder = Path(work_dir) / f"emoji-{split}"
    vendors = TRAIN_QUERY_VENDORS if split == "train" else ("twitter",)
    if rank == 0:
        builtin_manifest(folder, split=split, query_vendors=vendors, doc_vendor="google")
    if dist.is_initialized():
        dist.barrier()
    return folder / "manifest.jsonl"


def _composed(spec: str, split: str, work_dir: Path, rank: int) -> Path:
    from ..data.composed import SPLITS, composed_manifest

    split = spec[len(BUILTIN_EMOJI_COMPOSED) + 1:] or split  # "builtin:emoji-composed:val" names its split
    if split not in SPLITS:
        raise ValueError(f"manifest {spec}: the composed emoji split must be one of {SPLITS}, got {split!r}")
    folder = work_dir / f"emoji-composed-{split}"
    if rank == 0:
        composed_manifest(folder, split)
    if dist.is_initialized():
        dist.barrier()
    return folder / "manifest.jsonl"

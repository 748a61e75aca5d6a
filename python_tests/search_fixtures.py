"""A small trained run and its catalogue index, shared by the search tests (API, CLIs, service, page)."""

from __future__ import annotations

from pathlib import Path

from train_data import planted_manifest

from oclear_ext.search.cli import index_main
from oclear_ext.train import TrainConfig, train


def trained_run(folder: Path, steps: int = 30) -> tuple[Path, Path]:
    """(run folder, its planted-colour manifest): 8 colour classes, 3 query photos and 1 titled doc each."""
    manifest = planted_manifest(folder / "data")
    config = TrainConfig(train_manifest=str(manifest), out_dir=str(folder / "run"), dim=16, num_concepts=4, num_heads=2,
                         image_size=16, batch_size=8, lr=3e-3, classifier_lr=3e-2, weight_decay=0.0, warmup_steps=0,
                         scale=16.0, margin=(1.0, 0.0, 0.2), progress=False, log_every=10, max_steps=steps)
    train(config)
    return folder / "run", manifest


def built_index(run: Path, manifest: Path, out: Path, kind: str = "flat") -> Path:
    """oclear-index over the manifest's doc rows; returns the index folder."""
    index_main(["--checkpoint", str(run), "--manifest", str(manifest), "--out", str(out), "--kind", kind, "--no-progress"])
    return out

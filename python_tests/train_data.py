"""A tiny planted retrieval dataset for training tests: each class is a colour, drawn as noisy squares."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from oclear_ext.train import TrainConfig

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30),
           "purple": (140, 40, 180), "cyan": (40, 210, 210), "black": (10, 10, 10), "orange": (240, 140, 20)}


def planted_manifest(folder: Path, queries_per_class: int = 3, seed: int = 0) -> Path:
    """manifest.jsonl with, per colour class, noisy query images and one doc image titled with the colour."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for name, rgb in COLOURS.items():
        for k in range(queries_per_class + 1):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
            path = folder / "img" / f"{name}-{k}.png"
            Image.fromarray(pixels).save(path)
            role = "doc" if k == 0 else "query"
            rows.append({"image": f"img/{path.name}", "text": f"a {name} square" if role == "doc" else None,
                         "label": name, "role": role, "category": "colour"})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


# Light colours only: each has a distinct dark version (black and orange are left out).
COMPOSED_COLOURS = {name: COLOURS[name] for name in ("red", "green", "blue", "yellow", "purple", "cyan")}


def planted_composed_manifest(folder: Path, queries_per_class: int = 3, seed: int = 0) -> Path:
    """Composed queries: a light colour's image + the modifier "dark" -> the dark colour's class; plus plain
    colour queries. Per colour: a light and a dark doc (titled), queries_per_class queries of each kind."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []

    def image(name: str, rgb, k: int) -> str:
        pixels = np.clip(np.array(rgb) + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "img" / f"{name}-{k}.png")
        return f"img/{name}-{k}.png"

    for name, rgb in COMPOSED_COLOURS.items():
        dark = tuple(c // 3 for c in rgb)
        rows.append({"image": image(name, rgb, 0), "text": f"a {name} square", "label": name, "role": "doc"})
        rows.append({"image": image("dark-" + name, dark, 0), "text": f"a dark {name} square", "label": "dark " + name,
                     "role": "doc"})
        for k in range(1, queries_per_class + 1):
            rows.append({"image": image(name, rgb, k), "text": None, "label": "dark " + name, "role": "query",
                         "modifier": "dark"})
            rows.append({"image": image(name, rgb, 10 + k), "text": None, "label": name, "role": "query"})
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_config(manifest, out, **overrides) -> TrainConfig:
    """A TrainConfig small enough to train on the planted data in seconds: 16-d, small encoders, 16 px."""
    settings = dict(train_manifest=str(manifest), out_dir=str(out), dim=16, num_concepts=4, num_heads=2, image_size=16,
                    batch_size=8, optimizer="adamw", lr=3e-3, classifier_lr=3e-2, weight_decay=0.0, warmup_steps=0,
                    scale=16.0, margin=(1.0, 0.0, 0.2), progress=False, log_every=1)
    settings.update(overrides)
    return TrainConfig(**settings)

"""A tiny planted retrieval dataset for training tests: each class is a colour, drawn as noisy squares."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

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

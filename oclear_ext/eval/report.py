"""Evaluation outputs: metrics JSON, per-query JSON Lines, and a PNG grid of queries with their top docs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .evaluate import EvalResult


def write_results(result: EvalResult, out: str | Path, query_ids: Sequence[str], doc_ids: Sequence[str],
                  extra: dict | None = None) -> None:
    """out/metrics.json (metrics + extra run info) and out/per_query.jsonl (top docs by manifest id)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({**result.metrics, **(extra or {})}, indent=2) + "\n")
    with open(out / "per_query.jsonl", "w", encoding="utf-8") as f:
        for row in result.per_query:
            row = {**row, "query": query_ids[row["query"]],
                   "top": [{**t, "doc": doc_ids[t["doc"]]} for t in row["top"]]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def draw_grid(result: EvalResult, query_images: Sequence[str], doc_images: Sequence[str], path: str | Path,
              n_queries: int = 8, top: int = 5, tile: int = 64, seed: int = 0,
              query_captions: Sequence[str | None] | None = None) -> None:
    """PNG: one row per sampled query (its image, then its top docs); green frame = relevant, red = not.

    query_captions (one per query, optional): text written under the query image instead of "query", e.g.
    a composed query's modifier."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    rows = sorted(rng.choice(len(query_images), size=min(n_queries, len(query_images)), replace=False).tolist())
    if query_captions is not None and len(query_captions) != len(query_images):
        raise ValueError(f"draw_grid: {len(query_captions)} captions for {len(query_images)} queries")
    pad, gap = 4, 12
    # A caption may be wider than the tile: the query column widens to fit it (about 6 px per character).
    caption_width = max((6 * len(c) for c in query_captions or () if c), default=0)
    gap += max(0, caption_width - tile - 2 * pad)
    width = pad + (tile + 2 * pad) * (top + 1) + gap
    height = pad + (tile + 2 * pad + 14) * len(rows)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    def paste(path_: str, x: int, y: int, frame: tuple[int, int, int] | None) -> None:
        with Image.open(path_) as im:
            rgba = im.convert("RGBA").resize((tile, tile), Image.BILINEAR)
        if frame is not None:
            draw.rectangle([x - pad, y - pad, x + tile + pad - 1, y + tile + pad - 1], fill=frame)
        draw.rectangle([x, y, x + tile - 1, y + tile - 1], fill=(255, 255, 255))
        canvas.paste(rgba, (x, y), rgba)

    for row, r in enumerate(rows):
        y = pad + row * (tile + 2 * pad + 14) + pad
        paste(query_images[r], 2 * pad, y, (120, 120, 120))
        caption = query_captions[r] if query_captions is not None and query_captions[r] else "query"
        draw.text((2 * pad, y + tile + pad), caption, fill=(0, 0, 0))
        for j in range(min(top, result.ids.shape[1])):
            i = int(result.ids[r, j])
            if i < 0:
                continue
            x = 2 * pad + gap + (j + 1) * (tile + 2 * pad)
            paste(doc_images[i], x, y, (0, 170, 0) if result.relevant[r, j] else (220, 0, 0))
            draw.text((x, y + tile + pad), f"{j + 1}: {result.scores[r, j]:.2f}", fill=(0, 0, 0))
    canvas.save(path)

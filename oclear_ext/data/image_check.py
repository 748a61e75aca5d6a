"""Decode every image of a manifest before training, so a corrupt file fails at the start, not mid-epoch.

The check decodes each file fully (Pillow's `load`, which a truncated or corrupt file fails), on a pool
of threads (Pillow releases the GIL while decoding). Files already found good are remembered in a cache
file keyed by path, size and modification time, so a resumed run or a second run over the same
catalogue checks only what changed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import warnings
from dataclasses import replace
from pathlib import Path

from .manifest import ClassIndex, Manifest, ManifestError


def _decode_error(path: str) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad line, reported with its message
        return f"image {path} cannot be decoded ({type(err).__name__}: {err})"
    return None


def _stamp(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def check_manifest_images(manifest: Manifest, skip_bad: bool = False, cache_file: str | os.PathLike | None = None,
                          workers: int | None = None) -> Manifest:
    """Decodes every image; raises one ManifestError naming every bad line, or with skip_bad returns the
    manifest without those rows (and warns with their count). cache_file: JSON of files already found good."""
    cache: dict[str, list[int]] = {}
    if cache_file is not None and Path(cache_file).is_file():
        try:
            cache = json.loads(Path(cache_file).read_text())
        except json.JSONDecodeError:
            cache = {}  # a damaged cache only costs a full check
    stamps = {it.image: _stamp(it.image) for it in manifest.items}
    todo = sorted({path for path, stamp in stamps.items() if stamp is None or cache.get(path) != stamp})
    with concurrent.futures.ThreadPoolExecutor(workers or min(8, (os.cpu_count() or 1) + 2)) as pool:
        problems = {path: err for path, err in zip(todo, pool.map(_decode_error, todo)) if err is not None}
    if cache_file is not None:
        good = {path: stamp for path, stamp in stamps.items() if stamp is not None and path not in problems}
        tmp = Path(f"{cache_file}.tmp")
        tmp.write_text(json.dumps(good))
        os.replace(tmp, cache_file)
    if not problems:
        return manifest
    bad = [(it.line, problems[it.image]) for it in manifest.items if it.image in problems]
    if not skip_bad:
        raise ManifestError(manifest.path, bad)
    kept = [it for it in manifest.items if it.image not in problems]
    if not kept:
        raise ManifestError(manifest.path, bad + [(0, "no item with a readable image is left")])
    warnings.warn(f"manifest {manifest.path}: skipped {len(bad)} row(s) whose image cannot be decoded "
                  f"(lines {', '.join(str(n) for n, _ in bad[:20])}{', ...' if len(bad) > 20 else ''})", stacklevel=2)
    return replace(manifest, items=kept, class_index=ClassIndex.from_labels(it.label for it in kept))

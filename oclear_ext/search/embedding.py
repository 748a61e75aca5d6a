"""Embedding for search: query images from files, bytes or PIL images; a catalogue manifest's doc rows."""

from __future__ import annotations

import io
import os
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.dataset import ManifestDataset, collate, pil_to_tensor
from ..data.manifest import Manifest, ManifestItem


def model_device(model: Any) -> torch.device:
    """Where the model's parameters live (CPU for an embedding function without parameters)."""
    params = model.parameters() if hasattr(model, "parameters") else iter(())
    return next(iter(params), torch.empty(0)).device


class ImageReadError(ValueError):
    """A query image that cannot be decoded; the message names it."""


def read_image(source: Any, size: int | tuple[int, int], name: str | None = None) -> torch.Tensor:
    """A path, encoded bytes or a PIL image -> (3, H, W) float32 in [0, 1] at `size`, as training decodes it."""
    from PIL import Image, UnidentifiedImageError

    name = name or (str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__)
    if isinstance(source, Image.Image):
        return pil_to_tensor(source, size)
    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else open(source, "rb")
    except OSError as err:
        raise ImageReadError(f"cannot read image {name}: {err.strerror or err}") from None
    try:
        with handle, Image.open(handle) as im:
            return pil_to_tensor(im, size)  # decodes every pixel: a truncated file fails here, not later
    except UnidentifiedImageError:
        raise ImageReadError(f"cannot decode image {name}: not a recognised image format") from None
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt data
        raise ImageReadError(f"cannot decode image {name}: {err}") from None


@torch.no_grad()
def embed_query_images(model: Any, images: Any, batch_size: int = 64,
                       modifiers: Sequence[str | None] | None = None) -> np.ndarray:
    """(B, D) float32 L2-normalised query embeddings of images: a sequence of paths / bytes / PIL images,
    or a (B, 3, H, W) float tensor in [0, 1] already at the model's image_size. modifiers (B texts or None,
    optional): composed queries (a model trained with composed_queries=True)."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"embed_query_images: an image tensor must be (B, 3, H, W), got {tuple(images.shape)}")
        batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    else:
        if isinstance(images, (str, os.PathLike, bytes)):
            raise ValueError("embed_query_images: images must be a sequence (a list of paths), not one path")
        decoded = [read_image(x, model.image_size) for x in images]
        batches = [torch.stack(decoded[i:i + batch_size]) for i in range(0, len(decoded), batch_size)]
    device = model_device(model)
    if modifiers is None or all(m is None for m in modifiers):
        out = [F.normalize(model.embed_queries(b.to(device)).float(), dim=1).cpu() for b in batches]
    else:
        total = sum(len(b) for b in batches)
        if len(modifiers) != total:
            raise ValueError(f"embed_query_images: {total} images but {len(modifiers)} modifiers")
        starts = np.cumsum([0] + [len(b) for b in batches])
        out = [F.normalize(model.embed_queries(b.to(device), list(modifiers[s:s + len(b)])).float(), dim=1).cpu()
               for b, s in zip(batches, starts)]
    dim = getattr(getattr(model, "config", None), "dim", 0)
    return torch.cat(out).numpy() if out else np.zeros((0, dim), np.float32)


@torch.no_grad()
def embed_catalog_docs(manifest: Manifest, model: Any, batch_size: int = 256, num_workers: int = 0,
                       progress: bool = False) -> tuple[np.ndarray, list[ManifestItem]]:
    """(doc embeddings (Nd, D) float32 L2-normalised with the doc path (image + text fusion), the doc rows)."""
    items = [manifest.items[i] for i in manifest.indices("doc")]
    if not items:
        raise ValueError(f"embed_catalog_docs: {manifest.path} has no doc rows to index")
    dataset = ManifestDataset(manifest, image_size=model.image_size, roles=("doc",))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    device = model_device(model)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="embed docs", unit="doc", dynamic_ncols=True)
    chunks = []
    for batch in loader:
        chunks.append(F.normalize(model.embed_docs(batch["image"].to(device), batch["text"]).float(), dim=1).cpu())
        if bar is not None:
            bar.update(len(batch["text"]))
    if bar is not None:
        bar.close()
    return torch.cat(chunks).numpy(), items


def doc_metadata(items: Sequence[ManifestItem]) -> list[dict]:
    """docs.jsonl rows of manifest doc rows; a row without an id is named by its manifest line."""
    return [{"id": it.id if it.id is not None else f"line {it.line}", "label": it.label, "text": it.text,
             "image": it.image, "category": it.category} for it in items]

"""The embedding-function interface that evaluation calls, a pixel baseline, and extraction over a manifest.

Any object with these members plugs into `oclear-eval` and `embed_manifest` (a trained OclearModel
provides them through a factory, `--embedder package.module:factory --checkpoint PATH`):

    image_size: int | tuple[int, int]        size the Dataset resizes images to before calling
    embed_queries(images) -> (B, D) tensor   images: (B, 3, H, W) float32 in [0, 1], RGB over white
    embed_docs(images, texts) -> (B, D)      texts: list of B strings or None (docs without text)

Manifests with composed queries (query rows with a "modifier" text) need an embed_queries that takes
them: embed_queries(images, modifiers) with modifiers a list of B strings or None (OclearModel built with
composed_queries=True does); a plain embed_queries(images) is refused for such a manifest, by name.

Both are called under torch.no_grad() in batches; embeddings are L2-normalised afterwards, so the
search ranks by cosine. A factory is called as factory(checkpoint=PATH) or factory() without one.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from ..data.dataset import ManifestDataset, collate
from ..data.manifest import Manifest


@runtime_checkable
class EmbeddingFunction(Protocol):
    image_size: int | tuple[int, int]

    def embed_queries(self, images: torch.Tensor) -> torch.Tensor: ...

    def embed_docs(self, images: torch.Tensor, texts: Sequence[str | None]) -> torch.Tensor: ...


class PixelEmbedding:
    """Baseline: the image area-averaged to grid x grid pixels, centred per vector, L2-normalised (text ignored).

    Centring removes the overall brightness so the cosine compares layout and colour.
    """

    def __init__(self, grid: int = 8, image_size: int = 32):
        if grid < 1 or image_size < grid:
            raise ValueError(f"PixelEmbedding: need 1 <= grid <= image_size, got grid={grid}, image_size={image_size}")
        self.grid = grid
        self.image_size = image_size

    def embed_queries(self, images: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(images.float(), self.grid).flatten(1)
        return F.normalize(x - x.mean(dim=1, keepdim=True), dim=1)

    def embed_docs(self, images: torch.Tensor, texts: Sequence[str | None]) -> torch.Tensor:
        return self.embed_queries(images)


BUILTIN_EMBEDDERS: dict[str, Callable[..., EmbeddingFunction]] = {"pixels": PixelEmbedding}


def load_embedder(spec: str, checkpoint: str | None = None) -> EmbeddingFunction:
    """"pixels" or "package.module:factory"; the factory gets checkpoint= when one is given."""
    if spec in BUILTIN_EMBEDDERS:
        factory = BUILTIN_EMBEDDERS[spec]
    else:
        module, sep, attr = spec.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"load_embedder: expected 'pixels' or 'package.module:factory', got {spec!r}")
        factory = getattr(importlib.import_module(module), attr)
    fn = factory(checkpoint=checkpoint) if checkpoint is not None else factory()
    if not isinstance(fn, EmbeddingFunction):
        raise TypeError(f"load_embedder: {spec} returned {type(fn).__name__}, which lacks image_size / embed_queries / embed_docs")
    return fn


@torch.no_grad()
def embed_manifest(manifest: Manifest, fn: EmbeddingFunction, batch_size: int = 256, num_workers: int = 0,
                   query_role: str = "query") -> tuple[np.ndarray, np.ndarray]:
    """(query embeddings (Nq, D), doc embeddings (Nd, D)) in manifest order of the query_role and doc rows.

    query_role="doc" embeds the doc rows as queries too (with embed_queries), for doc-to-doc retrieval.
    """
    if any(manifest.items[i].modifier is not None for i in manifest.indices(query_role)):
        _require_modifier_support(fn)
    out = []
    for role, as_query in ((query_role, True), ("doc", False)):
        ds = ManifestDataset(manifest, image_size=fn.image_size, roles=(role,))
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
        chunks = []
        for batch in loader:
            modifiers = batch.get("modifier") if as_query else None
            if modifiers is not None and any(m is not None for m in modifiers):
                e = fn.embed_queries(batch["image"], modifiers)
            elif as_query:
                e = fn.embed_queries(batch["image"])
            else:
                e = fn.embed_docs(batch["image"], batch["text"])
            if e.ndim != 2 or e.shape[0] != batch["image"].shape[0]:
                raise ValueError(f"embed_manifest: embedding function returned shape {tuple(e.shape)} for a batch of {batch['image'].shape[0]}")
            chunks.append(F.normalize(e.float(), dim=1).cpu())
        out.append(torch.cat(chunks).numpy())
    return out[0], out[1]


def _require_modifier_support(fn: EmbeddingFunction) -> None:
    """Composed queries need embed_queries(images, modifiers): refuse an image-only embedder up front."""
    try:
        inspect.signature(fn.embed_queries).bind(None, None)
    except TypeError:
        raise ValueError(f"embed_manifest: the manifest has queries with a modifier text, but "
                         f"{type(fn).__name__}.embed_queries takes no modifiers (a model built with "
                         f"composed_queries=True does)") from None


def load_embeddings(path: str) -> np.ndarray:
    """(N, D) float32 from a .npy or a .pt file holding one tensor."""
    if path.endswith(".npy"):
        x = np.load(path)
    elif path.endswith((".pt", ".pth")):
        x = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"load_embeddings: {path} must hold one tensor, got {type(x).__name__}")
        x = x.float().numpy()
    else:
        raise ValueError(f"load_embeddings: expected a .npy or .pt file, got {path}")
    if x.ndim != 2:
        raise ValueError(f"load_embeddings: {path} must be (N, D), got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)

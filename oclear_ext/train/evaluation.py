"""Retrieval evaluation of a model during and after training (oclear_ext.eval on a manifest)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.manifest import Manifest, load_manifest
from ..eval import EvalResult, embed_manifest, evaluate


def evaluate_on_manifest(model: torch.nn.Module, manifest_path: str | Path, batch_size: int = 256
                         ) -> tuple[EvalResult, Manifest]:
    """Ranks the manifest's docs for each of its queries with `model` (in eval mode, restored after).

    Metrics at instance level, and at category level when every item has a category.
    """
    manifest = load_manifest(manifest_path)
    was_training = model.training
    model.eval()
    try:
        q, d = embed_manifest(manifest, model, batch_size=batch_size)
    finally:
        model.train(was_training)
    q_items = [manifest.items[i] for i in manifest.indices("query")]
    d_items = [manifest.items[i] for i in manifest.indices("doc")]
    with_categories = all(it.category is not None for it in (*q_items, *d_items))
    result = evaluate(q, d, [it.label for it in q_items], [it.label for it in d_items],
                      query_categories=[it.category for it in q_items] if with_categories else None,
                      doc_categories=[it.category for it in d_items] if with_categories else None)
    return result, manifest


def evaluate_model(model: torch.nn.Module, manifest_path: str | Path, batch_size: int = 256) -> dict:
    """The metrics dict of evaluate_on_manifest."""
    return evaluate_on_manifest(model, manifest_path, batch_size)[0].metrics

"""Retrieval evaluation of a model during and after training (oclear_ext.eval on a manifest)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.manifest import load_manifest
from ..eval import embed_manifest, evaluate


def evaluate_model(model: torch.nn.Module, manifest_path: str | Path, batch_size: int = 256) -> dict:
    """Recall@1/5/10 and mAP@10 (instance level, and category level when the manifest has categories)."""
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
    return result.metrics

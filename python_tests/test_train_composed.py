"""Training with composed queries on planted data: colour squares, and "dark" turns a colour into its dark class.

A query is the image of a light colour plus the modifier "dark"; its target is the dark colour's class. The
image alone points at the light colour's doc, the modifier alone at any dark doc: only the composition of
the two finds the target, which is what these tests check the trainer and the model learn.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from train_data import planted_composed_manifest, tiny_config

from oclear_ext.eval import embed_manifest, evaluate
from oclear_ext.data.manifest import load_manifest
from oclear_ext.search import load_model
from oclear_ext.train import TrainConfig, train

@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return str(planted_composed_manifest(tmp_path_factory.mktemp("composed")))


def tiny(manifest, out, **kw) -> TrainConfig:
    return tiny_config(manifest, out, **{"batch_size": 12, "composed_queries": True, **kw})


def r_at_1(model, manifest_path) -> float:
    m = load_manifest(manifest_path)
    q, d = embed_manifest(m, model)
    q_items = [m.items[i] for i in m.indices("query")]
    result = evaluate(q, d, [it.label for it in q_items], [m.items[i].label for i in m.indices("doc")])
    return result.metrics["instance"]["R@1"]


def test_adaptive_composition_learns_what_the_image_alone_cannot(manifest, tmp_path):
    summary = train(tiny(manifest, tmp_path / "adaptive", max_steps=80))
    assert all(np.isfinite(summary["losses"]))
    composed = load_model(tmp_path / "adaptive")
    assert composed.composer is not None and composed.composer.mode == "adaptive"
    # Half the queries are plain colour queries (retrievable from the image); the composed half needs both.
    assert r_at_1(composed, manifest) >= 0.9
    image_only = train(tiny(manifest, tmp_path / "image", max_steps=80, query_composition="image"))["model"]
    assert r_at_1(image_only, manifest) <= 0.6


def test_the_weighting_loss_joins_the_loss_and_trains_the_weight(manifest, tmp_path):
    on = train(tiny(manifest, tmp_path / "on", max_steps=3, seed=1))
    off = train(tiny(manifest, tmp_path / "off", max_steps=3, seed=1, composition_weight_loss=0.0))
    assert on["losses"][0] > off["losses"][0]  # the same first forward, plus a positive BCE
    before = torch.zeros_like(off["model"].composer.weight.weight)
    assert not torch.equal(on["model"].composer.weight.weight, before)


@pytest.mark.parametrize("mode", ["sum", "text"])
def test_baseline_modes_train(manifest, tmp_path, mode):
    summary = train(tiny(manifest, tmp_path / mode, max_steps=4, query_composition=mode))
    assert len(summary["losses"]) == 4 and all(np.isfinite(summary["losses"]))


def test_composed_training_with_sampled_negatives(manifest, tmp_path):
    summary = train(tiny(manifest, tmp_path / "topk", max_steps=4, negatives="topk:3"))
    assert all(np.isfinite(summary["losses"]))


@pytest.mark.slow
def test_two_processes_train_composed_queries(manifest, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "oclear_ext.train", "--train-manifest", manifest, "--out-dir", str(tmp_path / "two"), "--max-steps", "3",
           "--batch-size", "6", "--dim", "16", "--num-concepts", "4", "--num-heads", "2", "--image-size", "16",
           "--composed-queries", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2


def test_a_composed_manifest_needs_composed_queries(manifest, tmp_path):
    with pytest.raises(ValueError, match=r"has 18 composed queries .* but composed_queries = false"):
        train(tiny(manifest, tmp_path / "plain", max_steps=1, composed_queries=False))


def test_bad_composition_settings_are_named():
    with pytest.raises(ValueError, match="query_composition must be one of"):
        TrainConfig(query_composition="concat")
    with pytest.raises(ValueError, match="composition_temperature must be a finite number > 0"):
        TrainConfig(composition_temperature=0.0)
    with pytest.raises(ValueError, match="composition_weight_loss must be a finite number >= 0"):
        TrainConfig(composition_weight_loss=-1.0)

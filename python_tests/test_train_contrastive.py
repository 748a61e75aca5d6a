"""The CLCE term in the trainer: config fields, margin softmax + weight * contrastive (value and gradients),
with negatives sampling, with composed queries, training on planted data, and world 2 == one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from dist_harness import run_ranks
from dist_workers import set_rows, shard_grad
from train_data import planted_manifest

from oclear_ext import TopKNegatives
from oclear_ext.losses import label_aware_contrastive_loss
from oclear_ext.nn import ShardedMarginClassifier
from oclear_ext.train import TrainConfig, train
from oclear_ext.train.trainer import ContrastiveLoss, _classifier_loss

CLASSES, DIM = 7, 8
TERM = ContrastiveLoss(weight=0.7, temperature=0.2, hard_negative_beta=1.0)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return str(planted_manifest(tmp_path_factory.mktemp("planted")))


@pytest.mark.parametrize("field,value", [("contrastive_weight", -0.1), ("contrastive_weight", float("inf")),
                                         ("contrastive_temperature", 0.0), ("contrastive_temperature", -1.0),
                                         ("contrastive_temperature", float("nan")),
                                         ("contrastive_hard_negative_beta", -1.0)])
def test_bad_contrastive_settings_are_value_errors_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_defaults_leave_the_term_off():
    config = TrainConfig()
    assert config.contrastive_weight == 0.0 and config.contrastive_hard_negative_beta == 0.0
    assert config.contrastive_temperature > 0


def batch(n: int, seed: int):
    """Raw (pre-normalisation) rows, labels with repeats (positives) and one ignored row, class weights."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, DIM, generator=g)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    labels[1] = -100
    weight = torch.randn(CLASSES, DIM, generator=g)
    return raw, labels, weight


def head(weight: torch.Tensor, **kw) -> ShardedMarginClassifier:
    clf = ShardedMarginClassifier(CLASSES, DIM, scale=8.0, margin=(1.0, 0.0, 0.2), **kw)
    set_rows(clf, weight)
    return clf


def rows_loss_and_grad(clf, raw: torch.Tensor, labels: torch.Tensor, term: ContrastiveLoss | None):
    """_classifier_loss on normalize(raw): (loss, d loss / d raw, the classifier weight's gradient)."""
    param = raw.clone().requires_grad_(True)
    loss, backward = _classifier_loss(clf, F.normalize(param, dim=1), labels, raw.shape[0], 0.0, None, term)
    backward()
    return loss.detach(), param.grad, shard_grad(clf).clone()  # a plain tensor (a DTensor does not pickle)


@pytest.mark.parametrize("negatives", [None, "topk"])
def test_the_term_adds_weight_times_the_contrastive_loss_to_value_and_gradients(negatives):
    # Negatives sampling is the classifier's business: with top-k classes the margin softmax part changes, the
    # contrastive part does not, and the two add up (top-k is deterministic: both runs pick the same classes).
    raw, labels, weight = batch(12, seed=0)
    kw = dict(negatives=TopKNegatives(2), sparse_grad=True) if negatives else {}
    loss, grad, grad_w = rows_loss_and_grad(head(weight, **kw), raw, labels, TERM)
    margin, margin_grad, margin_grad_w = rows_loss_and_grad(head(weight, **kw), raw, labels, None)
    param = raw.clone().requires_grad_(True)
    contrastive = label_aware_contrastive_loss(F.normalize(param, dim=1), labels, TERM.temperature,
                                               TERM.hard_negative_beta)
    contrastive.backward()
    assert contrastive > 0
    torch.testing.assert_close(loss, margin + TERM.weight * contrastive.detach())
    torch.testing.assert_close(grad, margin_grad + TERM.weight * param.grad)
    torch.testing.assert_close(grad_w, margin_grad_w)  # the term never reaches the class weights


def test_the_term_combines_with_composed_queries_and_their_model_loss():
    from oclear_ext.models import ModelConfig, OclearModel
    from oclear_ext.train.trainer import CompositionLoss, batch_loss

    torch.manual_seed(0)
    model = OclearModel(ModelConfig(dim=DIM, num_concepts=4, num_heads=2, composed_queries=True))
    images = torch.rand(6, 3, 32, 32)
    texts = [None, None, "red apple", "green pear", None, "blue sky"]
    modifiers = ["darker", None, None, None, "brighter", None]
    is_query = torch.tensor([True, True, False, False, True, False])
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    keep = torch.ones(6, dtype=torch.bool)
    composition = CompositionLoss(weight=1.0, temperature=1.0)

    def run(term):
        model.zero_grad(set_to_none=True)
        clf = head(torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(1)))
        loss, backward = batch_loss(model, clf, images, texts, is_query, labels, keep, 0.0, None,
                                    modifiers=modifiers, composition=composition, contrastive=term)
        backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with_term, without = run(TERM), run(None)
    with torch.no_grad():  # the embeddings the term saw (train mode, as in batch_loss)
        out = model(images, texts, is_query, text_keep=keep, modifiers=modifiers)
    expected = TERM.weight * label_aware_contrastive_loss(out.float(), labels, TERM.temperature,
                                                          TERM.hard_negative_beta)
    torch.testing.assert_close(with_term[0] - without[0], expected, rtol=1e-5, atol=1e-6)
    composer = [n for n in without[1] if n.startswith("composer")]
    assert composer and all(n in with_term[1] for n in composer)  # the composition's loss still trains it
    assert any(not torch.allclose(with_term[1][n], without[1][n]) for n in without[1])


@pytest.mark.parametrize("negatives", ["none", "topk:3", "random:0.5"])
def test_training_with_the_term_learns_on_planted_data(manifest, tmp_path, negatives):
    config = TrainConfig(train_manifest=manifest, out_dir=str(tmp_path), dim=16, num_concepts=4, num_heads=2,
                         image_size=16, batch_size=8, lr=3e-3, classifier_lr=3e-2, weight_decay=0.0, warmup_steps=0,
                         scale=16.0, margin=(1.0, 0.0, 0.2), progress=False, log_every=1, max_steps=40,
                         negatives=negatives, contrastive_weight=0.5, contrastive_temperature=0.2,
                         contrastive_hard_negative_beta=1.0)
    losses = train(config)["losses"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["contrastive_weight"] == 0.5 and saved["contrastive_hard_negative_beta"] == 1.0


# --- world 2: the trainer's loss and row gradients equal one process's on the global batch ----------------------

def _trainer_rows_worker(rank, world_size, seed):
    raw, labels, weight = batch(12, seed)
    n = raw.shape[0] // world_size
    own = slice(rank * n, (rank + 1) * n)
    return rows_loss_and_grad(head(weight), raw[own], labels[own], TERM)  # grad_w: this rank's shard rows


def test_two_ranks_give_one_process_loss_and_row_gradients():
    raw, labels, weight = batch(12, seed=4)
    want, want_grad, want_grad_w = rows_loss_and_grad(head(weight), raw, labels, TERM)
    ranks = run_ranks(_trainer_rows_worker, 2, 4)
    for loss, _, _ in ranks:
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    # each rank's rows get d(global loss)/d(own rows): DDP's sum over ranks is then the one-process gradient
    torch.testing.assert_close(torch.cat([r[1] for r in ranks]), want_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([r[2] for r in ranks]), want_grad_w, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_two_processes_train_with_the_term_under_torchrun(manifest, tmp_path):
    # DDP's gradient all-reduces and the term's gathers share one process group: a run that finishes shows
    # they do not interleave in different orders on the two ranks.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "oclear_ext.train", "--train-manifest", manifest, "--out-dir", str(tmp_path / "two"), "--max-steps", "4",
           "--batch-size", "6", "--dim", "16", "--num-concepts", "4", "--num-heads", "2", "--image-size", "16",
           "--negatives", "topk:3", "--contrastive-weight", "0.5", "--contrastive-hard-negative-beta", "1",
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 4


@pytest.mark.slow
def test_demo_reports_the_clce_row_next_to_concept_fusion(tmp_path):
    from oclear_ext.train.demo import CLCE, run

    payload = run(["--out", str(tmp_path), "--image-encoder", "small-cnn", "--text-encoder", "hashing",
                   "--epochs", "1", "--max-steps", "2", "--batch-size", "32", "--seeds", "1"])
    assert list(payload["summary"]) == ["untrained", "image-only docs", "concept fusion", "concept fusion + CLCE"]
    assert CLCE["contrastive_weight"] > 0 and payload["clce"] == CLCE
    saved = json.loads((tmp_path / "run-fusion-clce-seed0" / "config.json").read_text())
    plain = json.loads((tmp_path / "run-fusion-seed0" / "config.json").read_text())
    # the same run as "concept fusion" but for the contrastive settings (and the folder)
    assert {k: v for k, v in saved.items() if k not in CLCE and k != "out_dir"} == \
        {k: v for k, v in plain.items() if k not in CLCE and k != "out_dir"}
    assert all(saved[k] == v for k, v in CLCE.items())
    assert json.loads((tmp_path / "metrics.json").read_text())["summary"].keys() == payload["summary"].keys()

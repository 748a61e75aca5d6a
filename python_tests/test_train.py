"""Training: config validation, learning on planted data, fused == reference ops, exact resume, 2-process gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from train_data import planted_manifest, tiny_config as tiny

import oclear_ext._ops.margin_softmax as margin_ops
import oclear_ext.nn.concept_attention as attention_module
from oclear_ext import reference
from oclear_ext.distributed import read_index
from oclear_ext.train import TrainConfig, parse_args, train


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return str(planted_manifest(tmp_path_factory.mktemp("planted")))


def test_loss_decreases_on_planted_data(manifest, tmp_path):
    summary = train(tiny(manifest, tmp_path, max_steps=40))
    losses = summary["losses"]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 40 and lines[-1]["samples_per_s"] > 0
    assert (tmp_path / "config.json").is_file() and (tmp_path / "classes.json").is_file()


def test_fused_ops_and_reference_ops_give_the_same_trajectory(manifest, tmp_path, monkeypatch):
    fused = train(tiny(manifest, tmp_path / "fused", max_steps=5))["losses"]

    def reference_full_loss(embeddings, weight, labels, settings, reduction):
        m1, m2, m3 = settings.margin
        return reference.margin_softmax_loss(embeddings, weight, labels, scale=settings.scale, margin=(m1, m2, m3),
                                             arcface_grad=settings.arcface_grad, ignore_index=settings.ignore_index,
                                             interclass_filter=settings.interclass_filter, reduction=reduction)

    monkeypatch.setattr(margin_ops, "_full_loss", reference_full_loss)
    monkeypatch.setattr(attention_module, "concept_attention", reference.concept_attention)
    plain = train(tiny(manifest, tmp_path / "plain", max_steps=5))["losses"]
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("negatives", ["none", "random:0.5"])
def test_resume_equals_an_uninterrupted_run(manifest, tmp_path, negatives):
    # 32 rows / batch 8 = 4 steps per epoch: the checkpoint at step 6 is in the middle of epoch 1.
    whole = train(tiny(manifest, tmp_path / "whole", max_steps=10, checkpoint_every=6, negatives=negatives,
                       optimizer="sgd", lr=0.05, classifier_lr=0.5, momentum=0.9))["losses"]
    resumed = train(tiny(manifest, tmp_path / "resumed", max_steps=10, negatives=negatives, optimizer="sgd", lr=0.05,
                         classifier_lr=0.5, momentum=0.9,
                         resume=str(tmp_path / "whole" / "checkpoints" / "step-00000006")))["losses"]
    assert resumed == whole[6:]


@pytest.mark.slow
def test_two_processes_train_and_the_checkpoint_loads_at_world_size_one(manifest, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "oclear_ext.train", "--train-manifest", manifest, "--out-dir", str(tmp_path / "two"), "--max-steps", "3",
           "--batch-size", "4", "--dim", "16", "--num-concepts", "4", "--num-heads", "2", "--image-size", "16",
           "--negatives", "topk:3", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 3
    checkpoint = tmp_path / "two" / "checkpoints" / "step-00000003"
    assert read_index(str(checkpoint / "classifier"))["world_size"] == 2
    resumed = train(tiny(manifest, tmp_path / "one", max_steps=4, negatives="topk:3", resume=str(checkpoint),
                         lr=1e-3, classifier_lr=None, weight_decay=0.05))
    assert resumed["step"] == 4 and len(resumed["losses"]) == 1
    with pytest.raises(ValueError, match="trained with optimizer = 'adamw', this run asks for 'sgd'"):
        train(tiny(manifest, tmp_path / "bad", max_steps=4, negatives="topk:3", resume=str(checkpoint), optimizer="sgd"))


@pytest.mark.parametrize("argv, match", [
    (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
    (["--negatives", "topk:-1"], "negatives must be none, topk:K"),
    (["--optimizer", "lamb"], "optimizer must be one of"),
    (["--dim", "30", "--num-heads", "4"], "dim = 30 must be divisible by num_heads = 4"),
    (["--text-loss-weight", "-1"], "text_loss_weight must be a finite number >= 0, got -1.0"),
    (["--text-encoder", "bert"], "text_encoder must be one of"),
])
def test_bad_flags_are_reported(argv, match, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert match in capsys.readouterr().err


def test_unknown_keys_in_a_config_file_are_reported(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('lr = 0.01\nlearning_rate = 0.1\n')
    with pytest.raises(ValueError, match=r"unknown keys \['learning_rate'\]"):
        TrainConfig.load(path)


def test_config_file_and_flags_combine(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('lr = 0.01\nepochs = 3\nmargin = [1.0, 0.5, 0.0]\n')
    config = parse_args(["--config", str(path), "--epochs", "5", "--no-fusion"])
    assert (config.lr, config.epochs, config.fusion, config.margin) == (0.01, 5, False, (1.0, 0.5, 0.0))


def test_missing_manifest_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest .*nope.jsonl does not exist"):
        train(tiny(str(tmp_path / "nope.jsonl"), tmp_path))


@pytest.mark.slow
def test_demo_runs_as_a_console_script_and_writes_its_outputs(tmp_path):
    # sys.exit(main()) is what the oclear-demo console script does: a non-None return would fail it.
    code = ("import sys; from oclear_ext.train.demo import main; sys.exit(main(['--out', sys.argv[1], "
            "'--image-encoder', 'small-cnn', '--epochs', '1', '--max-steps', '2', '--batch-size', '32']))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "held-out emoji (579 twitter queries" in proc.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"untrained", "image-only docs", "concept fusion", "concept fusion + CLCE"}
    assert (tmp_path / "retrieval.png").stat().st_size > 0 and (tmp_path / "training_curve.png").stat().st_size > 0


def test_text_loss_trains_the_text_path_and_never_moves_the_class_weights():
    from oclear_ext.models import ModelConfig, OclearModel
    from oclear_ext.nn import ShardedMarginClassifier
    from oclear_ext.train.trainer import batch_loss

    torch.manual_seed(0)
    model = OclearModel(ModelConfig(dim=16, num_concepts=4, num_heads=2))
    classifier = ShardedMarginClassifier(5, 16, scale=16.0)
    images = torch.rand(6, 3, 32, 32)
    texts = [None, "red apple", "green pear", None, "blue sky", ""]
    is_query = torch.tensor([True, False, False, True, False, False])
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    keep = torch.tensor([True, False, True, True, False, True])  # one doc keeps its text, two drop it

    def grads(weight: float) -> dict:
        model.zero_grad(set_to_none=True)
        classifier.zero_grad(set_to_none=True)
        loss, backward = batch_loss(model, classifier, images, texts, is_query, labels, keep, weight)
        backward()
        named = {"classifier": classifier.weight.grad.clone()}
        named.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return named

    without, with_text = grads(0.0), grads(1.0)
    assert classifier.weight.requires_grad  # restored after the text loss
    torch.testing.assert_close(with_text["classifier"], without["classifier"])  # text rows move no class
    attention = "fusion.text_to_concepts.q_proj.weight"
    assert attention in with_text and not torch.allclose(with_text[attention], without[attention])
    assert "fusion.concepts" in with_text and with_text["text_encoder.embed.weight"].abs().sum() > 0
    # The loss classifies what the text adds, normalize(W c): W itself is trained by it.
    assert not torch.allclose(with_text["fusion.context.weight"], without["fusion.context.weight"])


def test_demo_rejects_zero_seeds(tmp_path, capsys):
    from oclear_ext.train.demo import run

    with pytest.raises(SystemExit):
        run(["--out", str(tmp_path), "--seeds", "0"])
    assert "--seeds must be >= 1, got 0" in capsys.readouterr().err


def test_demo_query_models_are_checked(tmp_path, capsys):
    from oclear_ext.train.demo import run

    with pytest.raises(SystemExit):
        run(["--out", str(tmp_path), "--query-models", "composed, adaptive"])
    assert "--query-models is for --task composed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(["--out", str(tmp_path), "--task", "composed", "--query-models", "best"])
    assert "--query-models: unknown ['best']" in capsys.readouterr().err

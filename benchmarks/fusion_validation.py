"""Does concept-aware fusion beat image-only documents on classes it never trained on? Measured on a
validation split of the TRAINING emoji classes, so that no choice is made on the held-out classes.

Split: 25% of the 1,332 training classes (seed 123) are validation classes (twitter queries -> google
image + text docs); the models train on the other 75% (twitter and openmoji queries, google docs), with
the demo's settings (frozen EfficientNet-Lite0 + MiniLM, 6 epochs) and seeds 0, 1, 2.

  models   image-only docs, then fusion under the text-loss / text-dropout settings listed in CONFIGS
  probe    how much the text can add at all: the image-only model's doc embeddings plus alpha times a ridge
           regression (lambda) from MiniLM's mean-pooled sentence embedding to the class's mean query
           embedding, fitted on the training classes (a fixed-target, strongly regularised text path)

    python benchmarks/fusion_validation.py [--work DIR] [--seeds 0 1 2]    (~10 min on 2 cores)
    python benchmarks/fusion_validation.py --configs '[{"fusion": false}, {}]' --seeds 0 1 2 3 4 5 6 7 --tag _8seeds

Writes results/fusion_validation_cpu<tag>.json; the log is what it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from oclear_ext.data.manifest import load_manifest, write_manifest  # noqa: E402
from oclear_ext.eval import embed_manifest, evaluate  # noqa: E402
from oclear_ext.models.minilm import MiniLMTextEncoder  # noqa: E402
from oclear_ext.train import TrainConfig, train  # noqa: E402
from oclear_ext.train.data import resolve_manifest  # noqa: E402
from oclear_ext.train.evaluation import evaluate_on_manifest  # noqa: E402

CONFIGS = [dict(fusion=False), dict(text_loss_weight=0.0), dict(text_loss_weight=0.5), dict(text_loss_weight=1.0),
           dict(text_loss_weight=1.0, text_dropout=0.5), dict(text_loss_weight=1.0, text_dropout=0.9),
           dict(text_loss_weight=2.0)]
PROBE = [(lam, alpha) for lam in (1.0, 10.0) for alpha in (0.25, 0.5)]


def make_split(work: Path) -> tuple[Path, Path]:
    items = load_manifest(resolve_manifest("builtin:emoji", "train", work / "data")).items
    labels = sorted({it.label for it in items})
    val = set(random.Random(123).sample(labels, len(labels) // 4))
    train_path = write_manifest([it for it in items if it.label not in val], work / "train.jsonl")
    val_items = [it for it in items if it.label in val and (it.role == "doc" or it.id.endswith("/twitter"))]
    return train_path, write_manifest(val_items, work / "val.jsonl")


def train_model(train_path: Path, work: Path, seed: int, **overrides):
    kw = dict(train_manifest=str(train_path), out_dir=str(work / "run"), image_encoder="efficientnet-lite0",
              text_encoder="minilm", epochs=6, seed=seed, progress=False, log_every=1000)
    kw.update(overrides)
    return train(TrainConfig(**kw))["model"]


def probe(model, train_path: Path, val_path: Path) -> dict:
    """R@1 / mAP@10 of image-only docs + alpha * ridge(lambda) text embedding, for each (lambda, alpha)."""
    encoder = MiniLMTextEncoder(8)

    def sentences(texts: list[str]) -> np.ndarray:
        with torch.no_grad():
            states = encoder._hidden_states(texts, torch.device("cpu"))
        return F.normalize(torch.stack([h.mean(0) for h in states]), dim=1).double().numpy()

    tr, va = load_manifest(train_path), load_manifest(val_path)
    with torch.no_grad():
        q_tr, _ = embed_manifest(tr, model)
        q_va, d_va = embed_manifest(va, model)
    tr_q = [tr.items[i] for i in tr.indices("query")]
    va_q, va_d = [va.items[i] for i in va.indices("query")], [va.items[i] for i in va.indices("doc")]
    labels = sorted({it.label for it in tr_q})
    row = {label: i for i, label in enumerate(labels)}
    target = np.zeros((len(labels), q_tr.shape[1]))
    np.add.at(target, [row[it.label] for it in tr_q], q_tr)
    target /= np.bincount([row[it.label] for it in tr_q])[:, None]
    text_of = {it.label: it.text for it in tr.items if it.role == "doc"}
    x, x_va = sentences([text_of[label] for label in labels]), sentences([it.text for it in va_d])

    def score(docs: np.ndarray) -> dict:
        docs = docs / np.linalg.norm(docs, axis=1, keepdims=True)
        m = evaluate(q_va, docs.astype(np.float32), [it.label for it in va_q], [it.label for it in va_d])
        return {k: m.metrics["instance"][k] for k in ("R@1", "mAP@10")}

    out = {"image-only": score(d_va)}
    for lam, alpha in PROBE:
        w = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ target)
        t = x_va @ w
        out[f"ridge lambda={lam} alpha={alpha}"] = score(d_va + alpha * t / np.linalg.norm(t, axis=1, keepdims=True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="fusion-validation-work")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", type=json.loads, default=CONFIGS,
                        help="JSON list of TrainConfig overrides (default: the list in this file; {} = the defaults)")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    args = parser.parse_args()
    work = Path(args.work)
    train_path, val_path = make_split(work)
    env = common.environment(torch.device("cpu"))
    print(f"fusion validation: {len(load_manifest(val_path).indices('query'))} validation queries, seeds {args.seeds}, "
          f"torch {env['torch']}, git {env['git']['commit'][:10]}", flush=True)
    rows, probes = [], []
    for config in args.configs:
        per_seed = []
        for seed in args.seeds:
            model = train_model(train_path, work, seed, **config)
            per_seed.append(evaluate_on_manifest(model, val_path)[0].metrics["instance"])
            if config == dict(fusion=False):
                probes.append(probe(model, train_path, val_path))
        r1, ap = [m["R@1"] for m in per_seed], [m["mAP@10"] for m in per_seed]
        rows.append({"config": config, "R@1": r1, "mAP@10": ap})
        print(f"{json.dumps(config):48s} R@1 {statistics.mean(r1):.4f} {[round(v, 4) for v in r1]}  "
              f"mAP@10 {statistics.mean(ap):.4f} {[round(v, 4) for v in ap]}", flush=True)
    for name in probes[0] if probes else []:
        r1 = [p[name]["R@1"] for p in probes]
        ap = [p[name]["mAP@10"] for p in probes]
        print(f"probe {name:34s} R@1 {statistics.mean(r1):.4f} {[round(v, 4) for v in r1]}  "
              f"mAP@10 {statistics.mean(ap):.4f}", flush=True)
    path = common.write_json(f"fusion_validation_cpu{args.tag}.json",
                             {"benchmark": "fusion_validation", "environment": env, "seeds": args.seeds,
                              "rows": rows, "probe": probes})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

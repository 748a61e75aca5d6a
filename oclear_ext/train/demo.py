"""oclear-demo: train on the built-in emoji data and retrieve held-out emoji, next to baselines.

Task: a shopper's photo retrieves catalogue items with an image and a title. Here the "photo" is one vendor's
drawing of an emoji (twitter), the catalogue item is another vendor's drawing (google) plus the emoji's name
and keywords, and a class is an emoji. Training uses the training emoji (twitter and openmoji drawings as
queries, google drawings + text as docs); evaluation uses held-out emoji never seen in training.

The encoders are ImageNet EfficientNet-Lite0 and all-MiniLM-L6-v2 from PyPI (frozen, features cached: the
CPU trains the heads, the fusion and the classifier); --image-encoder small-cnn / --text-encoder hashing train
small encoders from scratch instead. Four models, same architecture and data, measured in this run, each
with --seeds seeds (the table shows mean +- sd over them):
  untrained           random weights (what the numbers would be without learning)
  image-only docs     trained, documents embedded from the image alone (fusion off)
  concept fusion      trained, documents fuse image and text with concept-aware attention (docs/design.md#model),
                      with text dropout and the text loss (what a doc's text adds classifies on its own,
                      class weights fixed)
  concept fusion + CLCE
                      concept fusion plus the label-aware contrastive loss with hard-negative weights (CLCE,
                      docs/contrastive.md) at the weight chosen on a validation split of the training classes
                      (benchmarks/contrastive_validation.py), never on the held-out classes
Writes metrics.json, retrieval.png (queries with their top-5 docs), training_curve.png into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..cli_errors import run_cli
from ..eval.cli import run_info
from ..eval.report import draw_grid
from ..models import ModelConfig, OclearModel
from ..models.registry import IMAGE_ENCODERS, TEXT_ENCODERS
from .config import TrainConfig
from .data import resolve_manifest
from .evaluation import evaluate_on_manifest
from .trainer import train

COLUMNS = ("R@1", "R@5", "R@10", "mAP@10")
# The "+ CLCE" row's settings: the pick of benchmarks/contrastive_validation.py on the validation split
# (results/contrastive_validation_cpu.json); TrainConfig's default stays contrastive_weight = 0 (off).
CLCE = dict(contrastive_weight=0.1, contrastive_temperature=0.1, contrastive_hard_negative_beta=1.0)
# name -> (run folder prefix, TrainConfig overrides)
TRAINED = {"image-only docs": ("image-only", dict(fusion=False)), "concept fusion": ("fusion", {}),
           "concept fusion + CLCE": ("fusion-clce", CLCE)}


def summarise(per_seed: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds of each metric in COLUMNS."""
    out = {}
    for c in COLUMNS:
        values = torch.tensor([m[c] for m in per_seed], dtype=torch.float64)
        out[c] = values.mean().item()
        out[c + " sd"] = values.std().item() if len(values) > 1 else 0.0
    return out


def format_rows(rows: dict[str, dict]) -> str:
    """One line per model: mean (and +- sd over seeds when there are several) of each metric."""
    with_sd = any(m[c + " sd"] > 0 for m in rows.values() for c in COLUMNS)
    width = 16 if with_sd else 9
    name_width = max([18] + [len(name) + 2 for name in rows])
    header = f"{'model':<{name_width}}" + "".join(f"{c:>{width}}" for c in COLUMNS)
    lines = [header, "-" * len(header)]
    for name, m in rows.items():
        cells = [f"{m[c]:.4f} +- {m[c + ' sd']:.3f}" if with_sd else f"{m[c]:.4f}" for c in COLUMNS]
        lines.append(f"{name:<{name_width}}" + "".join(f"{cell:>{width}}" for cell in cells))
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
    parser.add_argument("--task", default="retrieval", choices=("retrieval", "composed"),
                        help="retrieval: image queries -> image + text docs (this text); composed: reference image "
                             "+ modifier text -> target (oclear_ext.train.composed_demo)")
    parser.add_argument("--out", default="oclear-demo-output", help="output folder")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image-encoder", default="efficientnet-lite0", choices=IMAGE_ENCODERS)
    parser.add_argument("--text-encoder", default="minilm", choices=TEXT_ENCODERS)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=3,
                        help="train and evaluate each model with this many seeds (seed, seed + 1, ...); the table "
                             "shows mean +- sd: one seed's R@1 moves by about 2 points on 579 queries")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on training steps per model (smoke runs)")
    parser.add_argument("--models", nargs="+", default=list(TRAINED), choices=list(TRAINED), metavar="MODEL",
                        help=f"the trained models to run (default: all of {list(TRAINED)}; the untrained one is "
                             "always evaluated)")
    parser.add_argument("--query-models", nargs="+", default=None, metavar="MODEL",
                        help="--task composed: the query models to run (default: all four; names as in its table)")
    args = parser.parse_args(argv)
    if args.query_models is not None and args.task != "composed":
        parser.error("--query-models is for --task composed")
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.task == "composed":
        from .composed_demo import MODES, run_composed

        unknown = sorted(set(args.query_models or ()) - {name for name, _ in MODES})
        if unknown:
            parser.error(f"--query-models: unknown {unknown}; choose from {[name for name, _ in MODES]}")
        return run_composed(args, out, summarise, format_rows)
    t0 = time.perf_counter()
    heldout = resolve_manifest("builtin:emoji", "heldout", out / "data")

    seeds = list(range(args.seed, args.seed + args.seeds))
    trained = {name: TRAINED[name] for name in TRAINED if name in args.models}
    names = ("untrained", *trained)
    per_seed: dict[str, list] = {name: [] for name in names}
    curves, throughput, seconds = {}, {name: [] for name in names[1:]}, {name: [] for name in names[1:]}
    for seed in seeds:
        torch.manual_seed(seed)
        print(f"seed {seed}: evaluating the untrained model", flush=True)
        untrained = OclearModel(ModelConfig(image_encoder=args.image_encoder, text_encoder=args.text_encoder))
        per_seed["untrained"].append(evaluate_on_manifest(untrained, heldout)[0])
        for name, (folder, settings) in trained.items():
            print(f"seed {seed}: training {name}", flush=True)
            config = TrainConfig(out_dir=str(out / f"run-{folder}-seed{seed}"), image_encoder=args.image_encoder,
                                 text_encoder=args.text_encoder, epochs=args.epochs, batch_size=args.batch_size,
                                 seed=seed, max_steps=args.max_steps, log_every=10, **settings)
            t_train = time.perf_counter()
            summary = train(config)
            seconds[name].append(time.perf_counter() - t_train)
            curves.setdefault(name, summary["losses"])  # the first seed's curve
            throughput[name].append(summary["samples_per_s"])
            result, manifest = evaluate_on_manifest(summary["model"], heldout)
            per_seed[name].append(result)

    rows = {name: summarise([r.metrics["instance"] for r in results]) for name, results in per_seed.items()}
    table = format_rows(rows)
    q_items = [manifest.items[i] for i in manifest.indices("query")]
    d_items = [manifest.items[i] for i in manifest.indices("doc")]
    shown = "concept fusion" if "concept fusion" in trained else names[-1]
    draw_grid(per_seed[shown][0], [it.image for it in q_items], [it.image for it in d_items],
              out / "retrieval.png")
    plot_curves(curves, out / "training_curve.png")
    queries = per_seed["untrained"][0].metrics["instance"]["queries"]
    payload = {"summary": rows, "metrics": {name: [r.metrics for r in results] for name, results in per_seed.items()},
               "seeds": seeds, "models": list(trained), "train_samples_per_s": throughput, "train_seconds": seconds,
               "image_encoder": args.image_encoder, "text_encoder": args.text_encoder, "epochs": args.epochs,
               "batch_size": args.batch_size, "clce": CLCE, "seconds": time.perf_counter() - t0,
               "threads": torch.get_num_threads(), "run": run_info()}
    (out / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nheld-out emoji ({queries} twitter queries -> google image + text docs), "
          f"mean over seeds {seeds}\n{table}")
    # The first run computes the frozen encoders' features; later runs read them from the caches.
    print("training throughput (samples/s, per seed): "
          + "; ".join(f"{k} " + ", ".join(f"{x:.0f}" for x in v) for k, v in throughput.items()))
    print(f"wrote {out / 'metrics.json'}, {out / 'retrieval.png'}, {out / 'training_curve.png'} "
          f"({payload['seconds']:.0f} s)")
    return payload


def main(argv: list[str] | None = None) -> None:
    """The oclear-demo console script (returns None: a console script's return value becomes its exit status)."""
    run_cli(run, argv, "oclear-demo")


if __name__ == "__main__":
    main()

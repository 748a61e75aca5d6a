"""oclear-demo --task composed: composed queries (reference image + modifier text -> target) on held-out emoji.

A query is one vendor's drawing (twitter) of a reference emoji plus a short modifier ("medium-dark skin
tone", "woman", ...); the relevant document is the emoji the modifier turns it into (another class: a google
drawing plus its name and keywords). Training uses the composed pairs of the training emoji, evaluation the
held-out composed split, whose reference and target classes are never trained on. Four query models, the
same data, encoders and training, each with --seeds seeds (mean +- sd):
  image-only query      the modifier is ignored (today's image query)
  text-only query       the modifier alone (pooled text, no image)
  fixed 50/50 sum       normalize(image query + text query)
  composed, adaptive    the image reads the modifier through concept attention and a per-query weight,
                        trained with the self-supervised weighting signal, mixes the two (QueryComposer)
Writes metrics.json and retrieval.png (reference + modifier -> top-5) into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..data.manifest import load_manifest
from ..eval.cli import run_info
from ..eval.report import draw_grid
from .config import TrainConfig
from .data import BUILTIN_EMOJI_COMPOSED, resolve_manifest
from .evaluation import evaluate_on_manifest
from .trainer import train

MODES = (("image-only query", "image"), ("text-only query", "text"), ("fixed 50/50 sum", "sum"),
         ("composed, adaptive", "adaptive"))


def run_composed(args: argparse.Namespace, out: Path, summarise, format_rows) -> dict:
    """Trains and evaluates the four query models over the seeds; returns what it writes to metrics.json."""
    t0 = time.perf_counter()
    heldout = resolve_manifest(BUILTIN_EMOJI_COMPOSED, "heldout", out / "data")
    seeds = list(range(args.seed, args.seed + args.seeds))
    modes = [(name, mode) for name, mode in MODES if args.query_models is None or name in args.query_models]
    per_seed: dict[str, list] = {name: [] for name, _ in modes}
    weights: list[dict] = []
    first_adaptive = None
    for seed in seeds:
        for name, mode in modes:
            print(f"seed {seed}: training {name}", flush=True)
            config = TrainConfig(train_manifest=BUILTIN_EMOJI_COMPOSED, out_dir=str(out / f"run-{mode}-seed{seed}"),
                                 composed_queries=True, query_composition=mode, image_encoder=args.image_encoder,
                                 text_encoder=args.text_encoder, epochs=args.epochs, batch_size=args.batch_size,
                                 seed=seed, max_steps=args.max_steps, log_every=10)
            summary = train(config)
            result, manifest = evaluate_on_manifest(summary["model"], heldout)
            per_seed[name].append(result)
            if mode == "adaptive":
                weights.append(_weight_summary(summary["model"], manifest))
                first_adaptive = first_adaptive or (result, manifest)

    rows = {name: summarise([r.metrics["instance"] for r in results]) for name, results in per_seed.items()}
    result, manifest = first_adaptive or (per_seed[modes[0][0]][0], load_manifest(heldout))
    q_items = [manifest.items[i] for i in manifest.indices("query")]
    d_items = [manifest.items[i] for i in manifest.indices("doc")]
    draw_grid(result, [it.image for it in q_items], [it.image for it in d_items], out / "retrieval.png",
              query_captions=[f"+ {it.modifier}" for it in q_items])
    queries = result.metrics["instance"]["queries"]
    payload = {"task": "composed", "summary": rows, "seeds": seeds,
               "metrics": {name: [r.metrics for r in results] for name, results in per_seed.items()},
               "adaptive_weight": weights, "image_encoder": args.image_encoder, "text_encoder": args.text_encoder,
               "epochs": args.epochs, "batch_size": args.batch_size, "seconds": time.perf_counter() - t0,
               "threads": torch.get_num_threads(), "run": run_info()}
    (out / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nheld-out composed queries ({queries} twitter reference + modifier -> google image + text docs), "
          f"mean over seeds {seeds}\n{format_rows(rows)}")
    print(f"wrote {out / 'metrics.json'}, {out / 'retrieval.png'} ({payload['seconds']:.0f} s)")
    return payload


@torch.no_grad()
def _weight_summary(model, manifest) -> dict:
    """Mean adaptive weight of the image part on the held-out queries, per modifier kind (what the model learned)."""
    from ..data.dataset import ManifestDataset, collate

    model.eval()
    ds = ManifestDataset(manifest, image_size=model.image_size, roles=("query",))
    loader = torch.utils.data.DataLoader(ds, batch_size=256, collate_fn=collate)
    alphas: dict[str, list[float]] = {}
    for batch in loader:
        v = model.query_head(model.encoder(batch["image"]))
        _, parts = model._queries(v, batch["modifier"])
        for row, alpha in zip(parts["rows"].tolist(), parts["alpha"].tolist()):
            alphas.setdefault(batch["modifier"][row], []).append(alpha)
    return {m: sum(a) / len(a) for m, a in sorted(alphas.items())}

"""Which composed-query settings does oclear-demo --task composed use? Chosen on the VALIDATION split of the
composed emoji (groups of the training side, builtin:emoji-composed:val), never on the held-out split.

Every row trains on the composed training split with the demo's settings (frozen EfficientNet-Lite0 +
MiniLM, 6 epochs, batch 128) and evaluates the validation queries (reference + modifier -> target); the
fixed 50/50 sum is the reference row. The grid varies the self-supervised weighting: its loss weight
(0 = the adaptive weight trains only through the main loss) and the temperature of its targets.

    python benchmarks/composed_validation.py [--work DIR] [--seeds 0]    (~4 min per row and seed on 16 cores)

Writes results/composed_validation_cpu<tag>.json; the log is what it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from oclear_ext.data.manifest import load_manifest  # noqa: E402
from oclear_ext.train import TrainConfig, train  # noqa: E402
from oclear_ext.train.data import BUILTIN_EMOJI_COMPOSED, resolve_manifest  # noqa: E402
from oclear_ext.train.evaluation import evaluate_on_manifest  # noqa: E402

CONFIGS = [dict(query_composition="sum"), dict(composition_weight_loss=0.0),
           dict(composition_weight_loss=1.0, composition_temperature=1.0),
           dict(composition_weight_loss=1.0, composition_temperature=5.0),
           dict(composition_weight_loss=0.1, composition_temperature=1.0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="composed-validation-work")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--configs", type=json.loads, default=CONFIGS,
                        help="JSON list of TrainConfig overrides (default: the list in this file)")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    args = parser.parse_args()
    work = Path(args.work)
    val_path = resolve_manifest(BUILTIN_EMOJI_COMPOSED + ":val", "heldout", work / "data")
    env = common.environment(torch.device("cpu"))
    print(f"composed validation: {len(load_manifest(val_path).indices('query'))} validation queries, "
          f"seeds {args.seeds}, torch {env['torch']}, git {env['git']['commit'][:10]}", flush=True)
    rows = []
    for config in args.configs:
        per_seed = []
        for seed in args.seeds:
            kw = dict(train_manifest=BUILTIN_EMOJI_COMPOSED, out_dir=str(work / "run"), composed_queries=True,
                      image_encoder="efficientnet-lite0", text_encoder="minilm", epochs=6, batch_size=128,
                      seed=seed, progress=False, log_every=1000)
            model = train(TrainConfig(**{**kw, **config}))["model"]
            per_seed.append(evaluate_on_manifest(model, val_path)[0].metrics["instance"])
        r1, ap = [m["R@1"] for m in per_seed], [m["mAP@10"] for m in per_seed]
        rows.append({"config": config, "R@1": r1, "mAP@10": ap, "metrics": per_seed})
        print(f"{json.dumps(config):70s} R@1 {statistics.mean(r1):.4f} {[round(v, 4) for v in r1]}  "
              f"mAP@10 {statistics.mean(ap):.4f} {[round(v, 4) for v in ap]}", flush=True)
        common.write_json(f"composed_validation_cpu{args.tag}.json",  # partial results survive a cut-off
                          {"benchmark": "composed_validation", "environment": env, "seeds": args.seeds, "rows": rows})
    adaptive = [r for r in rows if r["config"].get("query_composition", "adaptive") == "adaptive"]
    if adaptive:
        best = max(adaptive, key=lambda r: (statistics.mean(r["R@1"]), statistics.mean(r["mAP@10"])))
        print(f"best adaptive setting on validation: {json.dumps(best['config'])}")
    print(f"wrote results/composed_validation_cpu{args.tag}.json")


if __name__ == "__main__":
    main()

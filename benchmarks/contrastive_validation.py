"""Which weight of the CLCE contrastive term (docs/contrastive.md) should the demo's "concept fusion + CLCE" row
use? Chosen on fusion_validation.py's validation split of the TRAINING emoji classes, never on the held-out ones.

Protocol (fusion_validation.py's): 25% of the 1,332 training classes (seed 123) are validation classes
(twitter queries -> google image + text docs); the models train on the other 75% with the demo's settings
(frozen EfficientNet-Lite0 + MiniLM, concept fusion with the text loss, 6 epochs), seeds 0, 1, 2. Grid:
contrastive_weight x contrastive_temperature x contrastive_hard_negative_beta (weight 0 = the margin softmax
alone, run once). The pick for the demo's "+ CLCE" row: the non-zero setting with the highest mean
validation mAP@10 over the seeds (R@1 breaks ties); the result also says whether it beats weight 0 on both
mean R@1 and mean mAP@10 (TrainConfig's default stays 0, off, either way).

    python benchmarks/contrastive_validation.py [--work DIR] [--seeds 0 1 2] [--weights 0 0.1 0.3 1]
        [--temperatures 0.1] [--betas 0 1] [--configs JSON] [--baseline-from results/fusion_validation_cpu.json]
        [--tag TAG]

--baseline-from takes the weight 0 row from fusion_validation.py's results instead of training it again: its
{"text_loss_weight": 1.0} row is this benchmark's weight 0 (the defaults, the same split, seeds and training;
training is deterministic, and a run of this benchmark reproduced that row's per-seed numbers exactly).

Writes results/contrastive_validation_cpu<tag>.json; the log is what it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from fusion_validation import make_split, train_model  # noqa: E402  (the same split and training settings)

from oclear_ext.data.manifest import load_manifest  # noqa: E402
from oclear_ext.train.evaluation import evaluate_on_manifest  # noqa: E402


def grid(weights: list[float], temperatures: list[float], betas: list[float]) -> list[dict]:
    """TrainConfig overrides: weight 0 once (temperature and beta do nothing then), then every combination."""
    configs = [dict(contrastive_weight=0.0)] if 0.0 in weights else []
    configs += [dict(contrastive_weight=w, contrastive_temperature=t, contrastive_hard_negative_beta=b)
                for w in weights if w for t in temperatures for b in betas]
    return configs


def means(row: dict) -> tuple[float, float]:
    return statistics.mean(row["mAP@10"]), statistics.mean(row["R@1"])


def pick(rows: list[dict]) -> tuple[dict, bool]:
    """(the non-zero-weight row with the highest mean mAP@10, then R@1; whether it beats weight 0 on both)."""
    base = next(r for r in rows if not r["config"]["contrastive_weight"])
    best = max((r for r in rows if r["config"]["contrastive_weight"]), key=means)
    return best, all(statistics.mean(best[k]) > statistics.mean(base[k]) for k in ("R@1", "mAP@10"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="fusion-validation-work")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.1, 0.3, 1.0])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.1])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--configs", type=json.loads, default=None,
                        help="JSON list of TrainConfig overrides replacing the grid's non-zero weights")
    parser.add_argument("--baseline-from", default=None,
                        help="fusion_validation results JSON whose default-fusion row is the weight 0 row")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    args = parser.parse_args()
    if 0.0 not in args.weights and not args.baseline_from:
        parser.error("--weights must include 0 (the margin softmax alone, the baseline of the pick)")
    work = Path(args.work)
    train_path, val_path = make_split(work)
    env = common.environment(torch.device("cpu"))
    print(f"contrastive validation: {len(load_manifest(val_path).indices('query'))} validation queries, "
          f"seeds {args.seeds}, torch {env['torch']}, {torch.get_num_threads()} threads, "
          f"git {env['git']['commit'][:10]}", flush=True)
    rows, t0 = [], time.perf_counter()
    configs = grid(args.weights, args.temperatures, args.betas)
    if args.configs is not None:
        configs = [c for c in configs if not c["contrastive_weight"]] + args.configs
    if args.baseline_from:
        rows.append(baseline_row(Path(args.baseline_from), args.seeds))
        configs = [c for c in configs if c["contrastive_weight"]]
        print(f"{json.dumps(rows[0]['config']):96s} R@1 {statistics.mean(rows[0]['R@1']):.4f} "
              f"{[round(v, 4) for v in rows[0]['R@1']]}  mAP@10 {statistics.mean(rows[0]['mAP@10']):.4f} "
              f"{[round(v, 4) for v in rows[0]['mAP@10']]}  (from {args.baseline_from})", flush=True)
    for config in configs:
        per_seed, seconds = [], []
        for seed in args.seeds:
            t = time.perf_counter()
            model = train_model(train_path, work, seed, **config)
            seconds.append(time.perf_counter() - t)
            per_seed.append(evaluate_on_manifest(model, val_path)[0].metrics["instance"])
        r1, ap = [m["R@1"] for m in per_seed], [m["mAP@10"] for m in per_seed]
        r5, r10 = [m["R@5"] for m in per_seed], [m["R@10"] for m in per_seed]
        rows.append({"config": config, "R@1": r1, "R@5": r5, "R@10": r10, "mAP@10": ap, "train_seconds": seconds})
        print(f"{json.dumps(config):96s} R@1 {statistics.mean(r1):.4f} {[round(v, 4) for v in r1]}  "
              f"mAP@10 {statistics.mean(ap):.4f} {[round(v, 4) for v in ap]}  "
              f"({statistics.mean(seconds):.0f} s per model)", flush=True)
        save(args, env, rows, t0, final=False)  # partial results survive an interrupted run
    chosen, beats = pick(rows)
    print(f"chosen: {json.dumps(chosen['config'])} (mean R@1 {statistics.mean(chosen['R@1']):.4f}, "
          f"mAP@10 {statistics.mean(chosen['mAP@10']):.4f}; {'beats' if beats else 'does not beat'} weight 0 on "
          f"both); {time.perf_counter() - t0:.0f} s in all", flush=True)
    print(f"wrote {save(args, env, rows, t0, final=True, chosen=chosen['config'], beats=beats)}")


def baseline_row(path: Path, seeds: list[int]) -> dict:
    data = json.loads(path.read_text())
    if data.get("seeds") != seeds:
        raise ValueError(f"--baseline-from {path}: seeds {data.get('seeds')}, this run {seeds}")
    row = next((r for r in data["rows"] if r["config"] == {"text_loss_weight": 1.0}), None)
    if row is None:
        raise ValueError(f'--baseline-from {path}: no {{"text_loss_weight": 1.0}} row')
    return {"config": {"contrastive_weight": 0.0}, "R@1": row["R@1"], "mAP@10": row["mAP@10"],
            "from": f"{path.name} {json.dumps(row['config'])}"}


def save(args, env, rows, t0, final: bool, chosen: dict | None = None, beats: bool | None = None) -> str:
    payload = {"benchmark": "contrastive_validation", "environment": env, "seeds": args.seeds, "rows": rows,
               "complete": final, "seconds": time.perf_counter() - t0}
    if final:
        payload.update(chosen=chosen, chosen_beats_weight_0=beats,
                       rule="non-zero weight with the highest mean mAP@10 (then R@1)")
    return common.write_json(f"contrastive_validation_cpu{args.tag}.json", payload)


if __name__ == "__main__":
    main()

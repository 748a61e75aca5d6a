"""Margin softmax training step with negative-class sampling: forward + backward + optimizer step.

Variants, in one process on the same inputs (N x D embeddings, C x D class weights, CosFace s=64 m=0.4),
each a full training step of the classifier (the embeddings' gradient is computed too):
  full_dense_sgd      the fused loss over all C classes + torch.optim.SGD(momentum=0.9) on the dense weight
  topk_1pct           TopKNegatives(k = 1% of C): fused scoring over all classes, fused loss over the
                      positives + k hardest, row-sparse gradient, oclear_ext.optim.RowSparseSGD step
  topk_10pct          the same with k = 10% of C
  random_10pct        RandomNegatives(rate=0.1) (Partial FC) + RowSparseSGD
  random_10pct_dense_sgd   the same sampling with a dense gradient and torch.optim.SGD: what the row-sparse
                      step saves
  partialfc_plain     Partial FC as plain PyTorch: sample, gather the rows, materialised margin softmax
                      (oclear_ext.reference) over them, momentum SGD written with index_add on the sampled rows
  scoring_1pct / scoring_10pct   the scoring op alone (oclear_ext.hardest_classes), for its share of top-k

    python benchmarks/bench_margin_softmax_sampling.py [--sizes 262144] [--repeats 5]

Writes benchmarks/results/margin_softmax_sampling_<device>_<dtype>.json and .png.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import oclear_ext  # noqa: E402
from oclear_ext import RandomNegatives, TopKNegatives, reference  # noqa: E402
from oclear_ext.nn import MarginSoftmaxLoss  # noqa: E402
from oclear_ext.optim import RowSparseSGD  # noqa: E402

COSFACE = dict(scale=64.0, margin=(1.0, 0.0, 0.4))
LR, MOMENTUM = 0.1, 0.9


def training_step(head: MarginSoftmaxLoss, opt: torch.optim.Optimizer, x: torch.Tensor, labels: torch.Tensor):
    def call():
        opt.zero_grad(set_to_none=True)
        xl = x.detach().requires_grad_(True)
        loss = head(xl, labels)
        loss.backward()
        opt.step()
        return loss.detach()

    return call


def partialfc_plain(w0: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, rate: float):
    """Partial FC written by hand in plain PyTorch (what a user without fused ops would run)."""
    weight, momentum = w0.clone(), torch.zeros_like(w0)
    c = w0.shape[0]

    def call():
        positives = torch.unique(labels)
        perm = torch.randperm(c)
        extra = perm[~torch.isin(perm, positives)][: max(int(rate * c) - positives.numel(), 0)]
        active = torch.sort(torch.cat([positives, extra])).values
        rows = weight[active].requires_grad_(True)
        xl = x.detach().requires_grad_(True)
        loss = reference.margin_softmax_loss(xl, rows, torch.searchsorted(active, labels), **COSFACE)
        loss.backward()
        with torch.no_grad():
            buf = momentum[active].mul_(MOMENTUM).add_(rows.grad)
            momentum[active] = buf
            weight.index_add_(0, active, buf, alpha=-LR)
        return loss.detach()

    return call


def make_variants(x: torch.Tensor, w0: torch.Tensor, labels: torch.Tensor) -> dict:
    n, d = x.shape
    c = w0.shape[0]

    def head(negatives=None, sparse_grad=False):
        module = MarginSoftmaxLoss(c, d, negatives=negatives, sparse_grad=sparse_grad, dtype=x.dtype, device=x.device,
                                   **COSFACE)
        with torch.no_grad():
            module.weight.copy_(w0)
        return module

    variants = {}
    full = head()
    variants["full_dense_sgd"] = training_step(full, torch.optim.SGD(full.parameters(), lr=LR, momentum=MOMENTUM), x, labels)
    for name, negatives in (("topk_1pct", TopKNegatives(c // 100)), ("topk_10pct", TopKNegatives(c // 10)),
                            ("random_10pct", RandomNegatives(rate=0.1, generator=torch.Generator().manual_seed(0)))):
        h = head(negatives, sparse_grad=True)
        variants[name] = training_step(h, RowSparseSGD(h.parameters(), lr=LR, momentum=MOMENTUM), x, labels)
    dense = head(RandomNegatives(rate=0.1, generator=torch.Generator().manual_seed(0)))
    variants["random_10pct_dense_sgd"] = training_step(
        dense, torch.optim.SGD(dense.parameters(), lr=LR, momentum=MOMENTUM), x, labels)
    variants["partialfc_plain"] = partialfc_plain(w0, x, labels, 0.1)
    positives = torch.unique(labels)
    for name, k in (("scoring_1pct", c // 100), ("scoring_10pct", c // 10)):
        variants[name] = lambda k=k: oclear_ext.hardest_classes(x, w0, k, exclude=positives)
    return variants


def bench_size(n: int, d: int, c: int, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    g = torch.Generator().manual_seed(c)
    x = torch.randn(n, d, generator=g).to(device, dtype)
    w0 = (0.01 * torch.randn(c, d, generator=g)).to(device, dtype)
    labels = torch.randint(0, c, (n,), generator=g).to(device)
    variants = make_variants(x, w0, labels)
    timings = common.time_interleaved(variants, device, repeats)  # the warm-up call creates optimizer state
    row = {"N": n, "D": d, "C": c, "variants": {}}
    for name, fn in variants.items():
        extra = common.peak_extra_bytes(fn, device)
        row["variants"][name] = {"time": timings[name], "peak_extra_bytes": extra}
        t = timings[name]
        print(f"  C={c:>9,} {name:<24} median {t.median_s * 1e3:9.1f} ms  [{t.min_s * 1e3:.1f}, {t.max_s * 1e3:.1f}]"
              f"  extra {extra / 2**20:9.1f} MiB", flush=True)
    # Ratios of medians, and of minima: on a machine shared with other jobs the minimum of round-robin
    # samples is the estimate least affected by load that comes and goes.
    for key, stat in (("ratios", "median_s"), ("ratios_of_min", "min_s")):
        t = {k: getattr(v["time"], stat) for k, v in row["variants"].items()}
        base = t["full_dense_sgd"]
        row[key] = {
            "speedup_topk_1pct": base / t["topk_1pct"],
            "speedup_topk_10pct": base / t["topk_10pct"],
            "speedup_random_10pct": base / t["random_10pct"],
            "speedup_random_10pct_dense_sgd": base / t["random_10pct_dense_sgd"],
            "speedup_partialfc_plain": base / t["partialfc_plain"],
            "scoring_share_topk_1pct": t["scoring_1pct"] / t["topk_1pct"],
            "scoring_share_topk_10pct": t["scoring_10pct"] / t["topk_10pct"],
        }
        print(f"  {key}: " + ", ".join(f"{k} {v:.2f}" for k, v in row[key].items()), flush=True)
    return row


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in rows[-1]["variants"] if not k.startswith("scoring")]
    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4.2), squeeze=False)
    for ax, row in zip(axes[0], rows):
        times = [row["variants"][k]["time"].median_s for k in names]
        ax.barh(names, times, color="tab:blue")
        ax.set_xlabel("train step time, median (s)")
        ax.set_title(f"C = {row['C']:,}")
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    common.save_figure(fig, path, title)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16_384, 65_536, 262_144], help="class counts C")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    for c in args.sizes:
        if c < 100:
            parser.error(f"--sizes: class counts must be >= 100 (k = 1% of C must be >= 1), got {c}")
    dtype = getattr(torch, args.dtype)
    env = common.environment(device)
    print(f"margin softmax sampling benchmark: N={args.n} D={args.d} dtype={dtype} on {env.get('gpu', env.get('cpu'))}, "
          f"{env['threads']} threads, torch {env['torch']}, git {env['git']['commit'][:10]}", flush=True)
    rows = [bench_size(args.n, args.d, c, device, dtype, args.repeats) for c in sorted(args.sizes)]
    stem = f"margin_softmax_sampling_{device.type}_{args.dtype}{args.tag}"
    payload = {"benchmark": "margin_softmax_sampling", "environment": env, "dtype": args.dtype,
               "repeats": args.repeats, "rows": rows}
    title = f"margin softmax train step with sampling, N={args.n}, D={args.d}, {args.dtype}"
    common.write_results(stem, payload, lambda path: plot(rows, path, title))
    return rows


if __name__ == "__main__":
    main()

"""Margin softmax forward+backward: the fused op against what a user would otherwise run.

Variants, in one process on the same inputs (N x D embeddings, C x D class weights):
  gemm3              the three plain GEMMs of the same shapes (logits, dX, dW): the practical ceiling
  fused              oclear_ext.margin_softmax_loss, CosFace (s=64, m=0.4), default backend (what a user gets)
  fused_cutlass      the same with backend="cutlass_sm90" (the fused CUTLASS GEMMs; CUDA sm_90 builds with them)
  fused_cutlass_store  the same with backward="store" (the forward keeps N x C bf16 values, no recompute)
  reference          oclear_ext.reference.margin_softmax_loss, same settings (materialises N x C)
  fused_marginfree   the fused op at margin (1, 0, 0), scale 1, on pre-normalised inputs
  fused_cutlass_marginfree   the same with backend="cutlass_sm90"
  lce                torch.nn.functional.linear_cross_entropy on the same pre-normalised inputs, no chunking
  lce_chunked_auto   the same with LinearCrossEntropyOptions() (torch's automatic batch chunking)
  lce_chunked_64     the same with batch chunks of 64 rows
  cce, cce_exact     on CUDA, cut-cross-entropy's linear_cross_entropy when installed: its default gradient
                     filter, and filter_eps=None (every gradient element kept)
  liger              Liger's LigerFusedLinearCrossEntropyLoss when installed, same margin-free setting
  liger_cmc512, liger_cmc2048   Liger with its chunk_mem_const tuned for this shape (256- / 1024-row chunks at 1M)
The margin-free rows compute the same loss as linear_cross_entropy (checked at run time). At the first size
every variant's gradients are also compared with a float64 reference (relative Frobenius error of dX, dW).

    python benchmarks/bench_margin_softmax.py              # C in {16,384; 65,536; 262,144}
    python benchmarks/bench_margin_softmax.py --large      # adds C = 1,048,576
    python benchmarks/bench_margin_softmax.py --device cuda   # bfloat16, N=1024, D=512, C up to 4,194,304

On CUDA a variant that runs out of memory at some C is recorded as skipped there (the materialised
reference does at the largest sizes), not fatal.
Writes <out>/margin_softmax_<device>_<dtype>.json and .png (--out, default benchmarks/results).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import oclear_ext  # noqa: E402
from oclear_ext import reference  # noqa: E402

DEFAULT_SIZES = (16_384, 65_536, 262_144)
LARGE_SIZE = 1_048_576
# CUDA defaults: the target shape (N=1024, D=512) from 64K to 4M classes.
CUDA_SIZES = (65_536, 262_144, 1_048_576, 4_194_304)
CUDA_N = 1024
COSFACE = dict(scale=64.0, margin=(1.0, 0.0, 0.4))
# Relative tolerance of the loss agreement check: 16-bit baselines return a 16-bit loss (2 ulp).
LOSS_RTOL = {torch.bfloat16: 2 * 2.0**-7, torch.float16: 2 * 2.0**-10}  # 2 ulp at 1
MARGIN_FREE = dict(scale=1.0, margin=(1.0, 0.0, 0.0))


def other_fused_losses() -> dict:
    """Installed third-party fused linear cross-entropies (CUDA only): name -> loss(x, w, labels)."""
    found = {}
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError:
        pass
    else:
        found["cce"] = lambda a, b, y: cce(a, b, y)
        found["cce_exact"] = lambda a, b, y: cce(a, b, y, filter_eps=None)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        pass
    else:
        liger = LigerFusedLinearCrossEntropyLoss()
        found["liger"] = lambda a, b, y: liger(b, a, y)
        # Liger sizes its row chunks as next_pow2(N / ceil(C / (chunk_mem_const * D))): at C = 1M, D = 512 the
        # default (1) gives 1-row chunks, a GEMV per row over all of W. Two settings tuned for this shape
        # (256- and 1024-row chunks at C = 1M), through the autograd function's chunk_mem_const argument
        # (liger-kernel 0.8.5, benchmarks/fetch_gpu_wheels.sh).
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as flce

        for const in (512, 2048):
            found[f"liger_cmc{const}"] = lambda a, b, y, c=const: flce.apply(
                a, b, y, None, None, -100, 0.0, 0.0, "mean", None, False, None, False, False, False, None, None, c)[0]
    return found


def cutlass_available(device: torch.device) -> bool:
    """Whether backend="cutlass_sm90" can run here: an sm_90 GPU and a build with the sm_90a kernels."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
            and bool(oclear_ext.build_info.get("fused_sm90")))


def with_class_chunk(fn, t: int):
    """fn run with t classes per chunk (the ops' class_chunk argument, through oclear_ext.margin_softmax_options)."""

    def call():
        with oclear_ext.margin_softmax_options(class_chunk=t):
            return fn()

    return call


def make_variants(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, chunks: list[int] = ()) -> tuple[dict, callable]:
    """(name -> a callable running forward+backward once and returning the loss, a gradient-clearing callable)."""
    x_hat = F.normalize(x.float(), dim=1).to(x.dtype)
    w_hat = F.normalize(w.float(), dim=1).to(w.dtype)
    # gemm3's upstream gradient: any N x C matrix, allocated once outside the timing.
    grad_logits = torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)

    def leaf(t):
        return t.detach().requires_grad_(True)

    xl, wl, xhl, whl = leaf(x), leaf(w), leaf(x_hat), leaf(w_hat)

    def clear_grads():
        for t in (xl, wl, xhl, whl):
            t.grad = None

    def run(loss_fn, a, b):
        def call():
            a.grad = None
            b.grad = None
            loss = loss_fn(a, b)
            loss.backward()
            return loss.detach()

        return call

    def gemm3():
        logits = x @ w.t()
        grad_x = grad_logits @ w
        grad_w = grad_logits.t() @ x
        return logits, grad_x, grad_w

    variants = {
        "gemm3": gemm3,
        "fused": run(lambda a, b: oclear_ext.margin_softmax_loss(a, b, labels, **COSFACE), xl, wl),
        "reference": run(lambda a, b: reference.margin_softmax_loss(a, b, labels, **COSFACE), xl, wl),
        "fused_marginfree": run(lambda a, b: oclear_ext.margin_softmax_loss(a, b, labels, **MARGIN_FREE), xhl, whl),
    }
    if hasattr(F, "linear_cross_entropy"):
        variants["lce"] = run(lambda a, b: F.linear_cross_entropy(a, b, labels), xhl, whl)
        if hasattr(torch.nn, "LinearCrossEntropyOptions"):
            opts = torch.nn.LinearCrossEntropyOptions
            auto, by64 = opts(), opts(batch_chunk_size=64, chunking_method=None)
            variants["lce_chunked_auto"] = run(lambda a, b: F.linear_cross_entropy(a, b, labels, options=auto), xhl, whl)
            variants["lce_chunked_64"] = run(lambda a, b: F.linear_cross_entropy(a, b, labels, options=by64), xhl, whl)
    if cutlass_available(x.device):
        fused_cutlass = dict(COSFACE, backend="cutlass_sm90")
        free_cutlass = dict(MARGIN_FREE, backend="cutlass_sm90")
        variants["fused_cutlass"] = run(lambda a, b: oclear_ext.margin_softmax_loss(a, b, labels, **fused_cutlass), xl, wl)
        variants["fused_cutlass_marginfree"] = run(
            lambda a, b: oclear_ext.margin_softmax_loss(a, b, labels, **free_cutlass), xhl, whl)

        def store(a, b):  # the store-E mode: N x C bf16 kept between forward and backward (budget lifted here)
            with oclear_ext.margin_softmax_options(store_budget_bytes=1 << 40):
                return oclear_ext.margin_softmax_loss(a, b, labels, backward="store", **fused_cutlass)

        variants["fused_cutlass_store"] = run(store, xl, wl)
    if x.is_cuda:
        for t in chunks:  # the CUDA glue's classes-per-chunk, swept to tune its default
            variants[f"fused_chunk{t}"] = with_class_chunk(variants["fused"], t)
        for name, loss_fn in other_fused_losses().items():
            variants[name] = run(lambda a, b, f=loss_fn: f(a, b, labels), xhl, whl)
    clear_grads.leaves = {"margin": (xl, wl), "marginfree": (xhl, whl)}
    return variants, clear_grads


MARGIN_FREE_VARIANTS = ("fused_marginfree", "fused_cutlass_marginfree", "lce", "lce_chunked_auto", "lce_chunked_64",
                        "cce", "cce_exact", "liger", "liger_cmc512", "liger_cmc2048")


def tangent(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """grad with each row's component along the input row removed: what a normalisation passes on."""
    g, r = grad.double(), rows.double()
    return g - r * (g * r).sum(1, keepdim=True) / (r * r).sum(1, keepdim=True).clamp_min(1e-300)


def gradient_errors(variants: dict, clear_grads, labels: torch.Tensor) -> dict:
    """name -> relative Frobenius error of (dX, dW) against float64, for every variant but gemm3.

    The margin-free peers take pre-normalised inputs and do not normalise, so their gradients are compared
    after the projection the normalisation would apply (ours are projected already: a no-op for them)."""
    refs = {}
    for key, (a, b) in clear_grads.leaves.items():
        a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        settings = MARGIN_FREE if key == "marginfree" else COSFACE
        reference.margin_softmax_loss(a64, b64, labels, **settings).backward()
        refs[key] = (a64.grad, b64.grad)
    out = {}
    for name, fn in variants.items():
        if name == "gemm3":
            continue
        key = "marginfree" if name in MARGIN_FREE_VARIANTS else "margin"
        clear_grads()
        fn()
        a, b = clear_grads.leaves[key]
        ga, gb = refs[key]
        da, db = tangent(a.grad, a), tangent(b.grad, b)
        out[name] = {"dX": ((da - ga).norm() / ga.norm()).item(), "dW": ((db - gb).norm() / gb.norm()).item()}
    clear_grads()
    return out


def drop_out_of_memory(variants: dict, clear_grads, device: torch.device) -> dict:
    """Runs each variant once on CUDA; the ones that run out of memory are removed (name -> reason)."""
    skipped = {}
    if device.type != "cuda":
        return skipped
    for name in list(variants):
        try:
            variants[name]()
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            skipped[name] = "out of memory"
            del variants[name]
        clear_grads()
        gc.collect()
        torch.cuda.empty_cache()
    return skipped


def check_agreement(variants: dict, dtype: torch.dtype) -> dict:
    """The fused op must compute what its baselines compute before their times are compared.

    A baseline that could not run (out of memory) is checked against nothing; the margin-free baselines
    are checked against the fused op at the margin-free setting. The tolerance is relative, and for
    16-bit inputs a few units of the dtype's rounding: plain PyTorch returns a bfloat16 / float16 loss
    (one bfloat16 ulp at a loss of 16 is 0.125), the fused op a float32 one.
    """
    out = {}
    fused = variants["fused"]().float()
    tol = dict(rtol=LOSS_RTOL.get(dtype, 1e-3), atol=1e-3)
    if "reference" in variants:
        ref = variants["reference"]().float()
        torch.testing.assert_close(fused, ref, **tol)
        out["fused_vs_reference_abs_diff"] = (fused - ref).abs().item()
    for name in ("fused_cutlass", "fused_cutlass_store"):
        if name in variants:
            cut = variants[name]().float()
            torch.testing.assert_close(cut, fused, **tol)
            out[f"{name}_vs_fused_abs_diff"] = (cut - fused).abs().item()
    free = variants["fused_marginfree"]().float()
    for name in ("fused_cutlass_marginfree", "lce", "cce", "cce_exact", "liger", "liger_cmc512", "liger_cmc2048"):
        if name in variants:
            other = variants[name]().float()
            torch.testing.assert_close(free, other, **tol)
            out[f"fused_marginfree_vs_{name}_abs_diff"] = (free - other).abs().item()
    return out


def predicted_seconds(previous: dict | None, name: str, c: int) -> float | None:
    """A variant's time per call at C, extrapolated linearly in C from the previous size."""
    if previous is None or name not in previous["variants"] or "time" not in previous["variants"][name]:
        return None
    return previous["variants"][name]["time"].median_s * c / previous["C"]


def bench_size(n: int, d: int, c: int, device: torch.device, dtype: torch.dtype, repeats: int,
               previous: dict | None, budget_s: float, chunks: list[int] = (), check_gradients: bool = False) -> dict:
    # Inputs drawn on the device itself on CUDA (a CPU draw of 4M x 512 takes longer than the benchmark).
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    g = torch.Generator(device=gen_device).manual_seed(c)
    x = torch.randn(n, d, generator=g, device=gen_device).to(device, dtype)
    w = (0.01 * torch.randn(c, d, generator=g, device=gen_device)).to(device, dtype)
    labels = torch.randint(0, c, (n,), generator=g, device=gen_device).to(device)
    variants, clear_grads = make_variants(x, w, labels, chunks)
    skipped = {}
    # Optional baselines predicted to take longer than the budget per call are skipped, and say so
    # (torch's automatic chunking grows faster than linearly in C here: results/margin_softmax_cpu_float32.log).
    for name in [k for k in variants if k.startswith("lce")]:
        predicted = predicted_seconds(previous, name, c)
        if predicted is not None and predicted > budget_s:
            skipped[name] = f"predicted {predicted:.0f} s per call > budget {budget_s:.0f} s"
            del variants[name]
    skipped.update(drop_out_of_memory(variants, clear_grads, device))
    row = {"N": n, "D": d, "C": c, "agreement": check_agreement(variants, dtype), "variants": {}}
    if check_gradients:
        row["gradient_error_vs_float64"] = gradient_errors(variants, clear_grads, labels)
        print("  gradient error vs float64: " + ", ".join(
            f"{k} dX {v['dX']:.2e} dW {v['dW']:.2e}" for k, v in row["gradient_error_vs_float64"].items()), flush=True)
    for name, reason in skipped.items():
        row["variants"][name] = {"skipped": reason}
        print(f"  C={c:>9,} {name:<18} skipped: {reason}", flush=True)
    timings = common.time_interleaved(variants, device, repeats)
    grads_bytes = (n * d + c * d) * x.element_size()
    for name, fn in variants.items():
        timing = timings[name]
        # Extra memory beyond the inputs and their gradients (every variant produces dX and dW).
        clear_grads()
        extra = max(0, common.peak_extra_bytes(fn, device) - grads_bytes)
        row["variants"][name] = {"time": timing, "peak_extra_bytes": extra,
                                 "useful_gflops": 6 * n * d * c / timing.median_s / 1e9}
        print(f"  C={c:>9,} {name:<18} median {timing.median_s * 1e3:9.1f} ms  "
              f"[{timing.min_s * 1e3:.1f}, {timing.max_s * 1e3:.1f}]  extra {extra / 2**20:9.1f} MiB", flush=True)
    t = {k: v["time"].median_s for k, v in row["variants"].items() if "time" in v}
    ratios = {"fused_over_gemm3": t["fused"] / t["gemm3"]}
    if "fused_cutlass" in t:
        ratios["fused_cutlass_over_gemm3"] = t["fused_cutlass"] / t["gemm3"]
        if "fused_cutlass_store" in t:
            ratios["fused_cutlass_store_over_gemm3"] = t["fused_cutlass_store"] / t["gemm3"]
        ratios["fused_cutlass_marginfree_over_gemm3"] = t["fused_cutlass_marginfree"] / t["gemm3"]
    if "reference" in t:
        ratios["reference_over_fused"] = t["reference"] / t["fused"]
    for name in ("cce", "cce_exact", "liger", "liger_cmc512", "liger_cmc2048"):
        if name in t:
            ratios[f"{name}_over_fused_marginfree"] = t[name] / t["fused_marginfree"]
            if "fused_cutlass_marginfree" in t:
                ratios[f"{name}_over_fused_cutlass_marginfree"] = t[name] / t["fused_cutlass_marginfree"]
    lce_names = [k for k in t if k.startswith("lce")]
    if lce_names:
        best = min(lce_names, key=t.get)
        ratios["best_lce"] = best
        ratios["best_lce_over_fused_marginfree"] = t[best] / t["fused_marginfree"]
    row["ratios"] = ratios
    print("  ratios: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in ratios.items()))
    return row


def fitted_exponents(rows: list[dict]) -> dict:
    """Least-squares slope of log(time) against log(C) per variant (1.0 = linear in C)."""
    if len(rows) < 2:
        return {}
    out = {}
    for name in dict.fromkeys(k for r in rows for k in r["variants"]):
        timed = [r for r in rows if "time" in r["variants"].get(name, {})]
        if len(timed) < 2:
            continue
        xs = [math.log(r["C"]) for r in timed]
        ys = [math.log(r["variants"][name]["time"].median_s) for r in timed]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        out[name] = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    return out


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(k for r in rows for k in r["variants"]):
        timed = [r for r in rows if "time" in r["variants"].get(name, {})]
        if not timed:
            continue
        cs = [r["C"] for r in timed]
        ax_t.plot(cs, [r["variants"][name]["time"].median_s for r in timed], marker="o", label=name)
        mem = [max(r["variants"][name]["peak_extra_bytes"], 1) / 2**20 for r in timed]
        ax_m.plot(cs, mem, marker="o", label=name)
    for ax, label in ((ax_t, "forward+backward time (s, median)"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of classes C")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    common.save_figure(fig, path, title)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--n", type=int, default=None, help=f"batch rows (default 256 on CPU, {CUDA_N} on CUDA)")
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help=f"class counts C (default {DEFAULT_SIZES} on CPU, {CUDA_SIZES} on CUDA)")
    parser.add_argument("--large", action="store_true", help=f"also C = {LARGE_SIZE:,}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=30.0,
                        help="skip a variant whose time per call, extrapolated from the previous size, exceeds this (s)")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument("--chunks", type=int, nargs="*", default=[],
                        help="CUDA only: also time the fused op at these classes-per-chunk (the class_chunk argument)")
    parser.add_argument("--out", default=common.RESULTS_DIR, help="folder for the JSON and PNG (default %(default)s)")
    parser.add_argument("--no-gradient-check", action="store_true",
                        help="skip the float64 gradient comparison at the first size")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.n is None:
        args.n = CUDA_N if device.type == "cuda" else 256
    if args.sizes is None:
        args.sizes = list(CUDA_SIZES if device.type == "cuda" else DEFAULT_SIZES)
    sizes = sorted(set(args.sizes + ([LARGE_SIZE] if args.large else [])))
    for c in sizes:
        if c < 1:
            parser.error(f"--sizes: class counts must be >= 1, got {c}")

    env = common.environment(device)
    print(f"margin softmax benchmark: N={args.n} D={args.d} dtype={dtype} on {env.get('gpu', env.get('cpu'))}, "
          f"{env['threads']} threads, torch {env['torch']}, git {env['git']['commit'][:10]}", flush=True)
    rows: list[dict] = []
    for c in sizes:
        rows.append(bench_size(args.n, args.d, c, device, dtype, args.repeats, rows[-1] if rows else None, args.budget,
                               args.chunks if device.type == "cuda" else [],
                               check_gradients=not rows and not args.no_gradient_check))
    exponents = fitted_exponents(rows)
    if exponents:
        print("fitted exponent of time in C: " + ", ".join(f"{k} {v:.2f}" for k, v in exponents.items()))

    stem = f"margin_softmax_{device.type}_{str(dtype).removeprefix('torch.')}{args.tag}"
    payload = {"benchmark": "margin_softmax", "environment": env, "dtype": str(dtype), "repeats": args.repeats,
               "rows": rows, "time_exponent_in_C": exponents}
    title = f"margin softmax fwd+bwd, N={args.n}, D={args.d}, {dtype}, {env.get('gpu', env.get('cpu'))}"
    common.write_results(stem, payload, lambda path: plot(rows, path, title), results_dir=args.out)
    return payload


if __name__ == "__main__":
    main()

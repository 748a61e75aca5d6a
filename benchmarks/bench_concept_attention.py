"""Concept attention forward+backward: the fused op against what a user would otherwise run.

Variants, in one process on the same inputs (q (B, H, Lq, Dh), k, v (B or 1, H, Lk, Dh), a random
key padding mask (B, Lk)), all under the same allocator (--allocator; no variant gets other settings):
  io_floor    what every implementation pays in memory: read q, k, v, dO and write four fresh outputs
              (out, dq, dk, dv; fresh pages are zeroed by the kernel on first touch)
  gemm6       the six plain batched GEMMs of a materialised attention's forward+backward
              (S = q k^T, O = P v, dV = P^T dO, dP = dO v^T, dQ = dS k, dK = dS^T q): the practical ceiling
  fused       oclear_ext.concept_attention, default settings (keeps no attention matrix, recomputes it in
              the backward; its outputs come from torch's allocator, like every other variant's)
  fused_cache (CPU) the same op with the opt-in output cache on (oclear_ext.cpu_output_cache.enabled(1 GiB)):
              its own row. Before each timed call the cache is turned on and one untimed call fills it (the
              steady state of a training loop); after it the cache is turned off and emptied, so that no
              other variant sees it
  fused_tc    (CUDA, bf16 / fp16) the same op with backend="tensor_core" (opt-in until verified on a GPU)
  sdpa        torch.nn.functional.scaled_dot_product_attention, mask materialised as it needs it
              ((B, 1, 1, Lk) bool, True = attend), a shared memory expanded (a view) to the batch
  reference   oclear_ext.reference.concept_attention (plain PyTorch, materialised scores)
"memory broadcast" rows give k, v batch 1 (the concept memory shared by the batch).

    python benchmarks/bench_concept_attention.py                      # the fusion's main shapes, glibc malloc
    python benchmarks/bench_concept_attention.py --allocator jemalloc # the same under jemalloc (re-executes
                                                                      # itself with LD_PRELOAD=libjemalloc.so.2)
    python benchmarks/bench_concept_attention.py --full     # B in {256, 1024, 4096} x Lq {1, 32} x Lk {32, 64, 256}
    python benchmarks/bench_concept_attention.py --device cuda --dtype bfloat16

Writes benchmarks/results/concept_attention_<device>_<dtype>[_<allocator>]<tag>.json and .png (no allocator
suffix for glibc); the committed .log beside them is the stdout of that run. Memory per variant: the peak
resident set above its inputs during one call (after the allocator's free pages were released, see
common.py) and what stays resident after it (`retained`: kept by the allocator or the cache for reuse).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import oclear_ext  # noqa: E402
from oclear_ext import reference  # noqa: E402

# (B, Lq, Lk, broadcast): the target shape first, then the two attentions of ConceptAwareFusion
# (text tokens x a 256-concept memory, image x its text tokens).
DEFAULT_SHAPES = [
    (1024, 32, 64, False),
    (1024, 32, 64, True),
    (1024, 32, 256, True),
    (4096, 1, 32, False),
    (256, 1, 64, False),
]

CACHE_LIMIT_BYTES = 1 << 30  # fused_cache: the output cache's limit (cpu_output_cache.DEFAULT_LIMIT_BYTES)


def with_cache(call):
    """The fused call with the output cache on, as its own variant: set-up turns the cache on and fills it with
    one untimed call (a training loop's steady state); tear-down turns it off, giving its blocks back."""
    def setup():
        oclear_ext.cpu_output_cache.set_limit(CACHE_LIMIT_BYTES)
        call()

    def teardown():
        oclear_ext.cpu_output_cache.set_limit(0)

    return common.Staged(call, setup, teardown)


def make_variants(q, k, v, pad, grad_out):
    b = q.shape[0]
    scale = q.shape[-1] ** -0.5
    attend = (~pad)[:, None, None, :]

    def leaf(t):
        return t.detach().requires_grad_(True)

    ql, kl, vl = leaf(q), leaf(k), leaf(v)

    def run(fn):
        def call():
            ql.grad = kl.grad = vl.grad = None
            out = fn(ql, kl, vl)
            out.backward(grad_out)
            return out.detach()

        return call

    kx, vx = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
    probs = torch.softmax(torch.randn(*q.shape[:3], k.shape[2], device=q.device, dtype=q.dtype), -1)

    def gemm6():
        s = torch.matmul(q, kx.transpose(-2, -1))
        o = torch.matmul(probs, vx)
        dv = torch.matmul(probs.transpose(-2, -1), grad_out)
        dp = torch.matmul(grad_out, vx.transpose(-2, -1))
        dq = torch.matmul(dp, kx)
        dk = torch.matmul(dp.transpose(-2, -1), q)
        return s, o, dv, dq, dk

    def io_floor():
        return q.clone(), q + grad_out, k.clone(), v.clone()

    def clear_grads():
        ql.grad = kl.grad = vl.grad = None

    variants = {
        "io_floor": io_floor,
        "gemm6": gemm6,
        "fused": run(lambda a, b_, c: oclear_ext.concept_attention(a, b_, c, pad)),
        **({"fused_cache": with_cache(run(lambda a, b_, c: oclear_ext.concept_attention(a, b_, c, pad)))}
           if q.device.type == "cpu" else {}),
        "sdpa": run(lambda a, b_, c: F.scaled_dot_product_attention(
            a, b_.expand(b, -1, -1, -1), c.expand(b, -1, -1, -1), attn_mask=attend, scale=scale)),
        "reference": run(lambda a, b_, c: reference.concept_attention(a, b_, c, pad)),
    }
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        variants["fused_tc"] = run(lambda a, b_, c: oclear_ext.concept_attention(a, b_, c, pad, backend="tensor_core"))
    return clear_grads, variants


def bench_shape(b, h, lq, lk, dh, broadcast, device, dtype, repeats):
    g = torch.Generator().manual_seed(b + lq + lk)
    kb = 1 if broadcast else b
    q = torch.randn(b, h, lq, dh, generator=g).to(device, dtype)
    k = torch.randn(kb, h, lk, dh, generator=g).to(device, dtype)
    v = torch.randn(kb, h, lk, dh, generator=g).to(device, dtype)
    pad = (torch.rand(b, lk, generator=g) < 0.3).to(device)
    pad[:, 0] = False  # SDPA returns NaN for a row without keys; keep one key per row for the comparison
    grad_out = torch.randn(b, h, lq, dh, generator=g).to(device, dtype)
    clear_grads, variants = make_variants(q, k, v, pad, grad_out)
    sdpa = variants["sdpa"]().float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    fused_names = [name for name in ("fused", "fused_cache", "fused_tc") if name in variants]
    checked = {name: variants[name]().float() for name in fused_names}
    for name, got in checked.items():  # never time something that computes another thing
        torch.testing.assert_close(got, sdpa, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    fused = checked["fused"]
    timings = common.time_interleaved(variants, device, repeats)
    flops = 12 * b * h * lq * lk * dh  # useful FLOPs of forward+backward (6 GEMMs, no recompute)
    row = {"B": b, "H": h, "Lq": lq, "Lk": lk, "Dh": dh, "memory_broadcast": broadcast,
           "max_abs_diff_fused_vs_sdpa": (fused - sdpa).abs().max().item(), "variants": {},
           "load_average": common.load_average()}
    grads_bytes = (q.numel() + k.numel() + v.numel()) * q.element_size()
    for name, fn in variants.items():
        t = timings[name]
        clear_grads()  # gradients held from the timing would hide the new ones in the peak
        if isinstance(fn, common.Staged):
            # The cache on and filled, then emptied: its blocks are counted as the fresh pages they were once
            # (the peak), and what it keeps after the call is its `retained` memory.
            fn.setup()
            clear_grads()
            oclear_ext.cpu_output_cache.empty()
            try:
                extra, retained = common.memory_of_call(fn.call, device, clear_grads)
            finally:
                fn.teardown()
        else:
            extra, retained = common.memory_of_call(fn, device, clear_grads)
        if name not in ("gemm6", "io_floor"):
            extra = max(0, extra - grads_bytes)
        row["variants"][name] = {"time": t, "peak_extra_bytes": extra, "retained_bytes": retained,
                                 "useful_gflops": flops / t.median_s / 1e9}
    med = {n: row["variants"][n]["time"].median_s for n in variants}
    row["ratios"] = {**{f"sdpa_over_{n}": med["sdpa"] / med[n] for n in fused_names},
                     "reference_over_fused": med["reference"] / med["fused"],
                     "fused_over_gemm6": med["fused"] / med["gemm6"], "fused_over_io_floor": med["fused"] / med["io_floor"],
                     "sdpa_over_io_floor": med["sdpa"] / med["io_floor"]}
    mib = lambda n, key: row["variants"][n][key] / 2**20  # noqa: E731
    print(f"B={b:5d} H={h} Lq={lq:3d} Lk={lk:4d} Dh={dh} {'shared' if broadcast else 'per-batch'} memory: "
          + "  ".join(f"{n} {med[n] * 1e3:8.1f} ms [{timings[n].min_s * 1e3:.1f}, {timings[n].max_s * 1e3:.1f}]" for n in variants)
          + "  | " + "  ".join(f"sdpa/{n} {row['ratios']['sdpa_over_' + n]:.2f}" for n in fused_names)
          + f"  reference/fused {row['ratios']['reference_over_fused']:.2f}  fused/gemm6 {row['ratios']['fused_over_gemm6']:.2f}"
          + "  | peak extra / retained MiB: "
          + "  ".join(f"{n} {mib(n, 'peak_extra_bytes'):.0f} / {mib(n, 'retained_bytes'):.0f}"
                      for n in (*fused_names, "sdpa", "reference"))
          + f"  | load {row['load_average'][0]:.2f}", flush=True)
    return row


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"B={r['B']}\nLq={r['Lq']} Lk={r['Lk']}\n{'shared' if r['memory_broadcast'] else 'per-batch'}" for r in rows]
    names = [n for n in ("io_floor", "gemm6", "fused", "fused_cache", "fused_tc", "sdpa", "reference") if n in rows[0]["variants"]]
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(max(10, 2.2 * len(rows)), 4.8))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(rows))]
        ax_t.bar(xs, [r["variants"][name]["time"].median_s * 1e3 for r in rows], width, label=name)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("forward+backward, median (ms)")
    ratios = [n for n in ("fused", "fused_cache", "fused_tc") if n in names]
    bar = 0.8 / len(ratios)
    for i, name in enumerate(ratios):
        xs = [j + (i - (len(ratios) - 1) / 2) * bar for j in range(len(rows))]
        ax_r.bar(xs, [r["ratios"]["sdpa_over_" + name] for r in rows], bar, label=name)
    ax_r.axhline(2.0, color="gray", ls="--", lw=1, label="target 2x")
    ax_r.set_ylabel("speed-up of fused over SDPA")
    for ax in (ax_t, ax_r):
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    common.save_figure(fig, path, title)


def parse_shape(text: str) -> tuple[int, int, int, bool]:
    """'B,Lq,Lk,shared|per-batch' -> (B, Lq, Lk, memory shared by the batch)."""
    parts = text.split(",")
    if len(parts) != 4 or parts[3] not in ("shared", "per-batch") or not all(p.isdigit() and int(p) > 0 for p in parts[:3]):
        raise argparse.ArgumentTypeError(f"expected B,Lq,Lk,shared|per-batch with positive sizes, got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2]), parts[3] == "shared"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--full", action="store_true", help="B in {256,1024,4096} x Lq {1,32} x Lk {32,64,256} x memory")
    parser.add_argument("--shape", action="append", type=parse_shape, metavar="B,Lq,Lk,MEMORY",
                        help="a shape to run instead of the default list (repeatable); MEMORY is shared or per-batch, "
                             "e.g. --shape 4096,32,256,per-batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--allocator", default="glibc", choices=["glibc", "jemalloc"],
                        help="malloc for every variant (jemalloc: re-executes this script with LD_PRELOAD="
                             "libjemalloc.so.2; GLIBC_TUNABLES / MALLOC_CONF in the environment pass through and are "
                             "recorded); default %(default)s")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", default=common.RESULTS_DIR, help="folder for the JSON and PNG (default %(default)s)")
    args = parser.parse_args(argv)
    if args.device == "cpu":  # on CUDA the host's malloc serves nothing that is timed
        common.use_allocator(args.allocator)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.full and args.shape:
        parser.error("--full and --shape choose the shapes in two ways: give one of them")
    if args.shape and not args.tag:
        parser.error("--shape needs a --tag, so that its results do not overwrite the default shapes' files")
    shapes = (list(itertools.product([256, 1024, 4096], [1, 32], [32, 64, 256], [False, True])) if args.full
              else args.shape or DEFAULT_SHAPES)
    env = common.environment(device)
    if device.type == "cpu":
        env["oclear_cpu_isa"] = torch.ops.oclear._concept_attention_cpu_isa()
        env["oclear_parallel_threads"] = torch.ops.oclear._parallel_threads_used(64)  # 1 = built without OpenMP
        env["oclear_cpu_output_cache_limit_bytes"] = oclear_ext.cpu_output_cache.stats().limit_bytes  # 0: off
        if env["oclear_cpu_output_cache_limit_bytes"]:
            parser.error("the output cache is on at start: fused would not be the default op")
    print(f"concept attention benchmark: H={args.heads} Dh={args.head_dim} {dtype} on {env.get('gpu', env.get('cpu'))}, "
          f"{env['threads']} threads, torch {env['torch']}, git {env['git']['commit'][:10]}"
          + (f", kernels {env['oclear_cpu_isa']} on {env['oclear_parallel_threads']} threads" if device.type == "cpu"
             else "")
          + (f", allocator {env['allocator']}" if device.type == "cpu" else "")
          + f", load average {env['load_average_at_start']}", flush=True)
    rows = [bench_shape(b, args.heads, lq, lk, args.head_dim, bc, device, dtype, args.repeats) for b, lq, lk, bc in shapes]
    env["load_average_at_end"] = common.load_average()
    print(f"load average at the end: {env['load_average_at_end']}", flush=True)
    allocator_suffix = "" if device.type == "cuda" or args.allocator == "glibc" else f"_{args.allocator}"
    stem = f"concept_attention_{device.type}_{str(dtype).removeprefix('torch.')}{allocator_suffix}{args.tag}"
    payload = {"benchmark": "concept_attention", "environment": env, "dtype": str(dtype), "repeats": args.repeats,
               "rows": rows}
    title = (f"concept attention fwd+bwd, H={args.heads}, Dh={args.head_dim}, {dtype}, {env.get('gpu', env.get('cpu'))}"
             + (f", {args.allocator}" if device.type == "cpu" else ""))
    common.write_results(stem, payload, lambda path: plot(rows, path, title), results_dir=args.out)
    return payload


if __name__ == "__main__":
    main()

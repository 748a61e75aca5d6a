"""Concept attention forward+backward: the fused op against what a user would otherwise run.

Variants, in one process on the same inputs (q (B, H, Lq, Dh), k, v (B or 1, H, Lk, Dh), a random
key padding mask (B, Lk)):
  io_floor   what every implementation pays in memory: read q, k, v, dO and write four fresh outputs
             (out, dq, dk, dv; fresh pages are zeroed by the kernel on first touch)
  gemm6      the six plain batched GEMMs of a materialised attention's forward+backward
             (S = q k^T, O = P v, dV = P^T dO, dP = dO v^T, dQ = dS k, dK = dS^T q): the practical ceiling
  fused      oclear_ext.concept_attention (keeps no attention matrix, recomputes it in the backward; on CPU
             its outputs come from the output cache, oclear_ext.cpu_output_cache: run with
             OCLEAR_CPU_OUTPUT_CACHE_MIB=0 to time it on fresh pages like the others)
  fused_tc   the same op with its tensor-core kernels (OCLEAR_CUDA_ATTENTION_TC=1; CUDA, bf16 / fp16; opt-in
             until verified on a GPU; where they do not apply the op runs its CUDA-core kernels)
  sdpa       torch.nn.functional.scaled_dot_product_attention, mask materialised as it needs it
             ((B, 1, 1, Lk) bool, True = attend), a shared memory expanded (a view) to the batch
  reference  oclear_ext.reference.concept_attention (plain PyTorch, materialised scores)
"memory broadcast" rows give k, v batch 1 (the concept memory shared by the batch).

    python benchmarks/bench_concept_attention.py            # the fusion's main shapes (~3 min on 2 cores)
    python benchmarks/bench_concept_attention.py --full     # B in {256, 1024, 4096} x Lq {1, 32} x Lk {32, 64, 256}
    python benchmarks/bench_concept_attention.py --device cuda --dtype bfloat16

Writes benchmarks/results/concept_attention_<device>_<dtype><tag>.json and .png; the committed .log beside them is
the stdout of that run.
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


ALLOCATOR_SETTINGS = ("OCLEAR_CPU_OUTPUT_CACHE_MIB", "MALLOC_MMAP_THRESHOLD_", "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")


def with_tensor_cores(call):
    """call() with the CUDA op's tensor-core kernels switched on (read by the op at every forward and backward)."""
    def wrapped():
        os.environ["OCLEAR_CUDA_ATTENTION_TC"] = "1"
        try:
            return call()
        finally:
            del os.environ["OCLEAR_CUDA_ATTENTION_TC"]

    return wrapped


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
        "sdpa": run(lambda a, b_, c: F.scaled_dot_product_attention(
            a, b_.expand(b, -1, -1, -1), c.expand(b, -1, -1, -1), attn_mask=attend, scale=scale)),
        "reference": run(lambda a, b_, c: reference.concept_attention(a, b_, c, pad)),
    }
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        variants["fused_tc"] = with_tensor_cores(variants["fused"])
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
    checked = {name: variants[name]().float() for name in ("fused", "fused_tc") if name in variants}
    for name, got in checked.items():  # never time something that computes another thing
        torch.testing.assert_close(got, sdpa, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    fused = checked["fused"]
    timings = common.time_interleaved(variants, device, repeats)
    # What the CPU output cache keeps between steps (freed outputs held for reuse, not in use).
    retained = oclear_ext.cpu_output_cache.stats().cached_bytes if device.type == "cpu" else 0
    flops = 12 * b * h * lq * lk * dh  # useful FLOPs of forward+backward (6 GEMMs, no recompute)
    row = {"B": b, "H": h, "Lq": lq, "Lk": lk, "Dh": dh, "memory_broadcast": broadcast,
           "max_abs_diff_fused_vs_sdpa": (fused - sdpa).abs().max().item(), "variants": {},
           "cpu_output_cache_retained_bytes": retained}
    grads_bytes = (q.numel() + k.numel() + v.numel()) * q.element_size()
    for name, fn in variants.items():
        t = timings[name]
        clear_grads()  # gradients held from the timing would hide the new ones in the peak
        if device.type == "cpu":
            oclear_ext.cpu_output_cache.empty()  # cached blocks are resident: the peak must count fresh ones
        extra = common.peak_extra_bytes(fn, device)
        if name not in ("gemm6", "io_floor"):
            extra = max(0, extra - grads_bytes)
        row["variants"][name] = {"time": t, "peak_extra_bytes": extra, "useful_gflops": flops / t.median_s / 1e9}
    med = {n: row["variants"][n]["time"].median_s for n in variants}
    row["ratios"] = {"sdpa_over_fused": med["sdpa"] / med["fused"], "reference_over_fused": med["reference"] / med["fused"],
                     **({"sdpa_over_fused_tc": med["sdpa"] / med["fused_tc"]} if "fused_tc" in med else {}),
                     "fused_over_gemm6": med["fused"] / med["gemm6"], "fused_over_io_floor": med["fused"] / med["io_floor"],
                     "sdpa_over_io_floor": med["sdpa"] / med["io_floor"]}
    print(f"B={b:5d} H={h} Lq={lq:3d} Lk={lk:4d} Dh={dh} {'shared' if broadcast else 'per-batch'} memory: "
          + "  ".join(f"{n} {med[n] * 1e3:8.1f} ms [{timings[n].min_s * 1e3:.1f}, {timings[n].max_s * 1e3:.1f}]" for n in variants)
          + f"  | sdpa/fused {row['ratios']['sdpa_over_fused']:.2f}"
          + (f"  sdpa/fused_tc {row['ratios']['sdpa_over_fused_tc']:.2f}" if "fused_tc" in med else "")
          + f"  reference/fused {row['ratios']['reference_over_fused']:.2f}"
          + f"  fused/gemm6 {row['ratios']['fused_over_gemm6']:.2f}  fused extra {row['variants']['fused']['peak_extra_bytes'] / 2**20:.0f} MiB"
          + f"  sdpa extra {row['variants']['sdpa']['peak_extra_bytes'] / 2**20:.0f} MiB"
          + (f"  cache retains {retained / 2**20:.0f} MiB" if device.type == "cpu" else ""), flush=True)
    return row


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"B={r['B']}\nLq={r['Lq']} Lk={r['Lk']}\n{'shared' if r['memory_broadcast'] else 'per-batch'}" for r in rows]
    names = [n for n in ("io_floor", "gemm6", "fused", "fused_tc", "sdpa", "reference") if n in rows[0]["variants"]]
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(max(10, 2.2 * len(rows)), 4.8))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(rows))]
        ax_t.bar(xs, [r["variants"][name]["time"].median_s * 1e3 for r in rows], width, label=name)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("forward+backward, median (ms)")
    ratios = [n for n in ("fused", "fused_tc") if n in names]
    for i, name in enumerate(ratios):
        xs = [j + (i - (len(ratios) - 1) / 2) * 0.4 for j in range(len(rows))]
        ax_r.bar(xs, [r["ratios"]["sdpa_over_" + name] for r in rows], 0.4, label=name)
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
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", default=common.RESULTS_DIR, help="folder for the JSON and PNG (default %(default)s)")
    args = parser.parse_args(argv)
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
        env["oclear_cpu_isa"] = torch.ops.oclear.concept_attention_cpu_isa()
        env["oclear_parallel_threads"] = torch.ops.oclear.parallel_threads_used(64)  # 1 = built without OpenMP
        env["oclear_cpu_output_cache_limit_bytes"] = oclear_ext.cpu_output_cache.stats().limit_bytes
    # Settings that change where large blocks come from (fresh pages or reused ones), as run.
    env["allocator_settings"] = {k: os.environ[k] for k in ALLOCATOR_SETTINGS if k in os.environ}
    print(f"concept attention benchmark: H={args.heads} Dh={args.head_dim} {dtype} on {env.get('gpu', env.get('cpu'))}, "
          f"{env['threads']} threads, torch {env['torch']}, git {env['git']['commit'][:10]}"
          + (f", kernels {env['oclear_cpu_isa']} on {env['oclear_parallel_threads']} threads" if device.type == "cpu"
             else ""), flush=True)
    rows = [bench_shape(b, args.heads, lq, lk, args.head_dim, bc, device, dtype, args.repeats) for b, lq, lk, bc in shapes]
    stem = f"concept_attention_{device.type}_{str(dtype).removeprefix('torch.')}{args.tag}"
    payload = {"benchmark": "concept_attention", "environment": env, "dtype": str(dtype), "repeats": args.repeats,
               "rows": rows}
    title = f"concept attention fwd+bwd, H={args.heads}, Dh={args.head_dim}, {dtype}, {env.get('gpu', env.get('cpu'))}"
    common.write_results(stem, payload, lambda path: plot(rows, path, title), results_dir=args.out)
    return payload


if __name__ == "__main__":
    main()

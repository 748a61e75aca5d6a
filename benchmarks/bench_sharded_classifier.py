"""Class-sharded margin softmax on CPU gloo: step time and bytes communicated per sample.

For world sizes 1, 2, 4 (fixed per-rank batch) and two class counts, each rank runs forward+backward of
ShardedMarginClassifier on its own embeddings. Bytes are measured on the wire: all ranks talk over the
loopback interface, whose transmitted-byte counter (/proc/net/dev) we read around the timed steps, so
the number includes gloo's framing and TCP/IP headers. The volume model, per sample of the global batch,
with gloo's algorithms (ring all-gather; all-reduce moving 2 (P-1)/P of the data per rank; gloo has no
reduce-scatter, so the gradient of the gathered embeddings is all-reduced and sliced):

    all-gather embeddings (P-1) 4D  +  labels (P-1) 8  +  max all-reduce 2 (P-1) 4
    + sum all-reduce of (sum-exp, target) 2 (P-1) 8  +  gradient all-reduce 2 (P-1) 4D
    = (P-1) (12 D + 32) bytes,  independent of C.

(With NCCL the gradient is reduce-scattered: (P-1)/P 4D per rank instead of 2 (P-1)/P 4D.)

    python benchmarks/bench_sharded_classifier.py [--dim 128] [--batch 64] [--classes 20000 200000]
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from oclear_ext.nn import ShardedMarginClassifier  # noqa: E402


def loopback_tx_bytes() -> int:
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, data = line.partition(":")
            if name.strip() == "lo":
                return int(data.split()[8])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def model_bytes_per_sample(world: int, dim: int) -> int:
    return (world - 1) * (12 * dim + 32)


def _worker(rank, world, port, args, num_classes, results):
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    clf = ShardedMarginClassifier(num_classes, args.dim, scale=32.0, margin=(1.0, 0.3, 0.0))
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.dim, generator=g).requires_grad_(True)
    labels = torch.randint(0, num_classes, (args.batch,), generator=g)

    def step():
        x.grad = None
        clf.weight.grad = None
        clf(x, labels).backward()

    for _ in range(2):
        step()
    dist.barrier()
    times, tx_before = [], loopback_tx_bytes()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    dist.barrier()
    tx = loopback_tx_bytes() - tx_before
    results.put((rank, times, tx))
    dist.destroy_process_group()


def run_world(world: int, num_classes: int, args) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, num_classes, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = [results.get(timeout=600) for _ in range(world)]
    for p in procs:
        p.join()
    times = [t for _, ts, _ in out for t in ts]
    # Every rank read the same machine-wide counter; rank 0's reading covers all ranks' traffic
    # (the barriers bracket the timed steps on every rank).
    tx = min(b for _, _, b in out)
    samples = args.steps * args.batch * world
    return {"world_size": world, "num_classes": num_classes, "step_median_s": statistics.median(times),
            "step_min_s": min(times), "step_max_s": max(times),
            "wire_bytes_per_sample": tx / samples, "model_bytes_per_sample": model_bytes_per_sample(world, args.dim)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=64, help="samples per rank")
    p.add_argument("--classes", type=int, nargs="+", default=[20_000, 200_000])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    env = common.environment(torch.device("cpu"))
    rows = []
    for c in args.classes:
        for world in args.worlds:
            row = run_world(world, c, args)
            rows.append(row)
            print(f"C={c:>8,} world={world}  step median {row['step_median_s'] * 1e3:8.1f} ms "
                  f"[{row['step_min_s'] * 1e3:.1f}, {row['step_max_s'] * 1e3:.1f}]  "
                  f"wire {row['wire_bytes_per_sample']:8.1f} B/sample  model {row['model_bytes_per_sample']:6d} B/sample",
                  flush=True)
    payload = {"benchmark": "sharded_classifier", "environment": env, "dim": args.dim, "batch_per_rank": args.batch,
               "steps": args.steps, "rows": rows}
    print("wrote", common.write_json("sharded_classifier_cpu_gloo.json", payload))
    return payload


if __name__ == "__main__":
    main()

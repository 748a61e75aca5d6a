"""Where the time of one concept_attention forward+backward goes on CUDA: torch.profiler's kernel table.

    python benchmarks/profile_concept_attention.py          # the target shape and B=4096, Lq=1 (bf16)
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

import oclear_ext

SHAPES = ((1024, 32, 64, False), (1024, 32, 64, True), (4096, 1, 32, False))  # (B, Lq, Lk, memory shared)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("profile_concept_attention: CUDA is not available")
    for b, lq, lk, shared in SHAPES:
        kb = 1 if shared else b
        opts = dict(device="cuda", dtype=torch.bfloat16)
        q = torch.randn(b, 8, lq, 64, **opts, requires_grad=True)
        k = torch.randn(kb, 8, lk, 64, **opts, requires_grad=True)
        v = torch.randn(kb, 8, lk, 64, **opts, requires_grad=True)
        pad = torch.rand(b, lk, device="cuda") < 0.3
        go = torch.randn(b, 8, lq, 64, **opts)
        for _ in range(3):
            oclear_ext.concept_attention(q, k, v, pad).backward(go)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                oclear_ext.concept_attention(q, k, v, pad).backward(go)
            torch.cuda.synchronize()
        print(f"B={b} Lq={lq} Lk={lk} {'shared' if shared else 'per-batch'} memory, 5 calls")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))


if __name__ == "__main__":
    main()

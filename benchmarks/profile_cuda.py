"""Where the GPU time of the package's ops goes: torch.profiler's kernel table for a few calls of each.

    python benchmarks/profile_cuda.py       # concept attention (bf16; CUDA-core and tensor-core kernels)
                                            # and the margin softmax (bf16, N=1024, D=512, C=1M)
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

import oclear_ext

ATTENTION_SHAPES = ((1024, 32, 64, False), (1024, 32, 64, True), (4096, 1, 32, False))  # (B, Lq, Lk, shared memory)


def table(title: str, step, calls: int = 5) -> None:
    """Profiles `calls` calls of step() after three warm-up calls and prints the kernels by CUDA time."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    print(f"{title}, {calls} calls")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70), flush=True)


def attention(tensor_cores: bool) -> None:
    backend = "tensor_core" if tensor_cores else "cuda_core"
    for b, lq, lk, shared in ATTENTION_SHAPES:
        opts = dict(device="cuda", dtype=torch.bfloat16)
        q = torch.randn(b, 8, lq, 64, **opts, requires_grad=True)
        k = torch.randn(1 if shared else b, 8, lk, 64, **opts, requires_grad=True)
        v = torch.randn(1 if shared else b, 8, lk, 64, **opts, requires_grad=True)
        pad = torch.rand(b, lk, device="cuda") < 0.3
        go = torch.randn(b, 8, lq, 64, **opts)
        table(f"concept attention ({'tensor' if tensor_cores else 'CUDA'} cores) B={b} Lq={lq} Lk={lk} "
              f"{'shared' if shared else 'per-batch'} memory",
              lambda: oclear_ext.concept_attention(q, k, v, pad, backend=backend).backward(go))


def margin_softmax() -> None:
    x = torch.randn(1024, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1 << 20, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1 << 20, (1024,), device="cuda")
    table("margin softmax (CosFace) N=1024 D=512 C=1M", lambda: oclear_ext.margin_softmax_loss(x, w, labels).backward())


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("profile_cuda: CUDA is not available")
    attention(tensor_cores=False)
    attention(tensor_cores=True)
    margin_softmax()


if __name__ == "__main__":
    main()

"""Small calls of every oclear_ext CUDA kernel, for compute-sanitizer (run by benchmarks/gpu_check.sh).

    compute-sanitizer --tool memcheck python benchmarks/cuda_sanitizer_calls.py

Covers, for float32 / float64 / bfloat16 / float16: row normalisation (contiguous and strided
inputs), the forward epilogue over several chunks (a forced small chunk, so chunk edges, a label
per edge, ignored rows and a row-block of a class shard occur), the backward epilogue, the dW and dx
projections (each gradient alone and both), the device label check (a bad label, whose error is
expected), N = 1, and an empty batch; then hardest_classes (its chunked merge in the glue) for
each dtype with and without excluded classes; then concept_attention forward+backward for float32 /
bfloat16 / float16 over query tiles with a ragged edge, key counts below, at and above a tile, head
dims 16 to 256, shared and per-batch memories, random and fully padded rows, and the same for the
tensor-core kernels (backend="tensor_core") in bfloat16 / float16. Every result is checked for
NaN / inf, so a run that the sanitizer passes also computed something finite. Exit status 0 when every
call behaved.
"""

from __future__ import annotations

import sys

import torch

import oclear_ext
from oclear_ext._ops.margin_softmax import MarginSettings

FORWARD = torch.ops.oclear.margin_softmax_forward.default
BACKWARD = torch.ops.oclear.margin_softmax_backward.default
FORWARD_STORED = torch.ops.oclear.margin_softmax_forward_stored.default
BACKWARD_STORED = torch.ops.oclear.margin_softmax_backward_stored.default


def check_finite(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.numel() and not torch.isfinite(t.float()).all():
            raise AssertionError(f"{name}: non-finite output")


def margin_softmax_calls(device: torch.device) -> int:
    calls = 0
    g = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        with oclear_ext.margin_softmax_options(class_chunk=13):  # several chunks on tiny problems
            for n, c, d, class_start in ((17, 50, 24, 0), (1, 40, 7, 0), (9, 31, 33, 20)):
                num_classes = class_start + c + 5
                x = torch.randn(n, d, generator=g).to(device, dtype)
                w_store = torch.randn(d, c + 3, generator=g).to(device, dtype)
                w = w_store.t()[1:c + 1]  # strided rows: the kernels read the weight in place
                labels = torch.randint(class_start, class_start + c, (n,), generator=g)
                labels[: min(n, 3)] = torch.tensor([class_start, class_start + 12, class_start + 13])[: min(n, 3)]
                if n > 4:
                    labels[4] = -100
                    labels[3] = num_classes - 1  # outside this block
                labels = labels.to(device)
                for settings in (MarginSettings(32.0, (1.0, 0.5, 0.0), "exact", 0.4),
                                 MarginSettings(64.0, (1.0, 0.0, 0.35)),
                                 MarginSettings(16.0, (1.7, 0.1, 0.05), "straight_through")):
                    args = (class_start, num_classes, *settings.op_args())
                    lse, target, w_inv = FORWARD(x, w, labels, *args)
                    check_finite("forward", lse, target, w_inv)
                    gl = torch.rand(n, device=device, dtype=lse.dtype)
                    for need_x, need_w in ((True, True), (True, False), (False, True)):
                        gx, gw = BACKWARD(gl, -gl, x, w, labels, lse, w_inv, *args, need_x, need_w)
                        check_finite("backward", gx, gw)
                        calls += 1
        # The public loss end to end, default chunking, and an empty batch; 16-bit also beside an fp32 weight.
        weights = (dtype, torch.float32) if dtype in (torch.bfloat16, torch.float16) else (dtype,)
        for w_dtype in weights:
            x = torch.randn(5, 16, device=device, dtype=dtype, requires_grad=True)
            w = torch.randn(300, 16, device=device, dtype=w_dtype, requires_grad=True)
            loss = oclear_ext.margin_softmax_loss(x, w, torch.tensor([0, 299, 150, -100, 7], device=device))
            loss.backward()
            check_finite("loss", loss, x.grad, w.grad)
            calls += 1
        empty = oclear_ext.margin_softmax_loss(x[:0].detach(), w.detach(), torch.zeros(0, dtype=torch.long, device=device),
                                               reduction="none")
        assert empty.shape == (0,)
        calls += 1
    # The label check kernel with a bad label: the error is expected.
    x = torch.randn(4, 8, device=device)
    w = torch.randn(10, 8, device=device)
    try:
        oclear_ext.margin_softmax_loss(x, w, torch.tensor([0, 3, 10, -100], device=device))
    except IndexError as err:
        assert "labels[2] = 10 is out of range" in str(err), err
    else:
        raise AssertionError("an out-of-range label did not raise")
    return calls + 1


def fused_margin_softmax_calls(device: torch.device) -> int:
    """backend="cutlass_sm90" (bf16, sm_90 builds with the fused kernels), recompute and store-E modes: ragged
    row and class tiles, a class shard, chunk edges, ignored rows, a row that takes the true-max path; 0 where
    unavailable."""
    if torch.cuda.get_device_capability(device) != (9, 0) or not oclear_ext.build_info.get("fused_sm90"):
        return 0
    calls = 0
    g = torch.Generator(device="cpu").manual_seed(1)
    # Ragged rows, tiles and class counts (the last C mod 8 classes take the CUDA-core kernels; C = 3: only them).
    for n, c, d, class_start, chunk in ((130, 700, 64, 0, 256), (1, 300, 8, 0, None), (1, 3, 8, 0, None),
                                        (257, 1000, 136, 40, 512)):
        num_classes = class_start + c + 3
        direction = torch.randn(d, generator=g)
        w = (direction + 0.3 * torch.randn(c, d, generator=g)).to(device, torch.bfloat16)
        x = torch.randn(n, d, generator=g)
        x[0] = -direction  # cos near -1 with every class: its fixed-shift sum underflows, the true-max path runs
        x = x.to(device, torch.bfloat16)
        labels = torch.randint(class_start, class_start + c, (n,), generator=g)
        labels[n // 2:n // 2 + 1] = -100
        labels = labels.to(device)
        settings = MarginSettings(64.0, (1.0, 0.5, 0.0), class_chunk=chunk, backend="cutlass_sm90")
        args = (class_start, num_classes, *settings.op_args())
        lse, target, w_inv = FORWARD(x, w, labels, *args)
        check_finite("fused forward", lse, target, w_inv)
        gl = torch.rand(n, device=device)
        for need_x, need_w in ((True, True), (False, True), (True, False)):
            check_finite("fused backward", *BACKWARD(gl, -gl, x, w, labels, lse, w_inv, *args, need_x, need_w))
            calls += 1
        # Store-E mode: the forward also writes E', the backward reads it (and recomputes row 0, lost to the flush).
        lse_s, target_s, w_inv_s, stored = FORWARD_STORED(x, w, labels, *args)
        check_finite("fused forward (store-E)", lse_s, target_s, w_inv_s, stored)
        check_finite("fused backward (store-E)",
                     *BACKWARD_STORED(gl, -gl, x, w, labels, lse_s, w_inv_s, stored, *args, True, True))
        calls += 2
    return calls


def class_topk_calls(device: torch.device) -> int:
    """hardest_classes on CUDA: the normalisation kernel plus the glue's chunked ATen merge."""
    calls = 0
    g = torch.Generator(device="cpu").manual_seed(1)
    with oclear_ext.margin_softmax_options(class_chunk=13):
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            x = torch.randn(7, 12, generator=g).to(device, dtype)
            w = torch.randn(12, 90, generator=g).to(device, dtype).t()  # strided rows
            for k, exclude in ((0, []), (5, [0, 12, 13, 89]), (86, [1, 2, 3, 4])):
                scores, ids = oclear_ext.hardest_classes(x, w, k, exclude=torch.tensor(exclude, dtype=torch.long, device=device))
                assert ids.shape == (k,) and not set(ids.tolist()) & set(exclude)
                check_finite("class_topk", scores)
                calls += 1
    return calls


ATTENTION_SHAPES = ((3, 2, 1, 1, 16, False), (2, 3, 33, 65, 64, False), (4, 2, 17, 130, 80, True),
                    (2, 1, 5, 300, 128, True), (2, 2, 3, 40, 256, False))
# The tensor-core kernels' cases (backend="tensor_core"): ragged query tiles, keys off the 16-key tile.
TENSOR_CORE_SHAPES = ((3, 2, 1, 3, 16, False), (2, 2, 70, 100, 64, False), (3, 2, 33, 144, 64, True),
                      (2, 1, 17, 176, 32, True))


def concept_attention_calls(device: torch.device, tensor_cores: bool = False) -> int:
    """concept_attention forward and backward on shapes that hit every tile edge of the CUDA kernels."""
    calls = 0
    g = torch.Generator(device="cpu").manual_seed(2)
    backend = "tensor_core" if tensor_cores else "cuda_core"
    dtypes = (torch.bfloat16, torch.float16) if tensor_cores else (torch.float32, torch.bfloat16, torch.float16)
    for dtype in dtypes:
        for b, h, lq, lk, dh, shared in TENSOR_CORE_SHAPES if tensor_cores else ATTENTION_SHAPES:
            q = torch.randn(b, h, lq, dh, generator=g).to(device, dtype).requires_grad_(True)
            kb = 1 if shared else b
            k = torch.randn(kb, h, lk, dh, generator=g).to(device, dtype).requires_grad_(True)
            v = torch.randn(kb, h, lk, dh, generator=g).to(device, dtype).requires_grad_(True)
            pad = torch.rand(b, lk, generator=g) < 0.3
            pad[-1] = True  # a fully padded row: zeros out, zero gradients
            out = oclear_ext.concept_attention(q, k, v, pad.to(device), backend=backend)
            out.backward(torch.randn(out.shape, generator=g).to(device, dtype))
            check_finite("concept_attention", out, q.grad, k.grad, v.grad)
            assert not out[-1].any() and not q.grad[-1].any(), "a fully padded row must give zeros"
            calls += 1
    return calls


def main() -> int:
    if not torch.cuda.is_available():
        print("cuda_sanitizer_calls: CUDA is not available", file=sys.stderr)
        return 2
    if not oclear_ext.build_info["with_cuda"]:
        print(f"cuda_sanitizer_calls: oclear_ext was built without CUDA kernels: {oclear_ext.build_info}", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    calls = margin_softmax_calls(device)
    fused_calls = fused_margin_softmax_calls(device)
    topk_calls = class_topk_calls(device)
    attention_calls = concept_attention_calls(device)
    tc_calls = concept_attention_calls(device, tensor_cores=True)
    torch.cuda.synchronize()
    print(f"cuda_sanitizer_calls: {calls} margin-softmax, {fused_calls} fused (cutlass_sm90) margin-softmax, {topk_calls} hardest-classes, {attention_calls} "
          f"concept-attention and {tc_calls} tensor-core concept-attention calls completed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

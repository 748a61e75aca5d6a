"""CUDA concept attention against the CPU op (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from attention_cases import assert_shared_memory_not_expanded, make_attention_inputs, output_and_grads
from conftest import requires_cuda

import oclear_ext

pytestmark = requires_cuda


@pytest.mark.parametrize("lq, lk, dh", [(1, 32, 64), (32, 64, 64), (17, 257, 80), (64, 512, 128), (5, 3, 256), (3, 40, 16)])
@pytest.mark.parametrize("broadcast", [False, True])
def test_cuda_matches_cpu_float32(lq, lk, dh, broadcast):
    q, k, v, mask = make_attention_inputs(3, 2, lq, lk, dh, broadcast=broadcast, pad_fraction=0.3, empty_rows=1,
                                          dtype=torch.float32, seed=lq + lk)
    grad_out = torch.randn_like(q)
    cpu = output_and_grads(oclear_ext.concept_attention, q, k, v, mask, grad_out)
    gpu = output_and_grads(oclear_ext.concept_attention, *(t.cuda() for t in (q, k, v)), mask.cuda(), grad_out.cuda())
    for name, c, g in zip(("out", "grad_q", "grad_k", "grad_v"), cpu, gpu):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def assert_within_twice_pytorch_error(b, lq, lk, dh, broadcast, dtype, seed, backend="auto"):
    """Ours (low precision) vs the float64 reference: at most twice the error of plain PyTorch in that dtype."""
    q, k, v, mask = make_attention_inputs(b, 2, lq, lk, dh, broadcast=broadcast, pad_fraction=0.3, empty_rows=1, seed=seed)
    grad_out = torch.randn_like(q)
    exact = output_and_grads(oclear_ext.reference.concept_attention, q, k, v, mask, grad_out)
    low = [t.to("cuda", dtype) for t in (q, k, v)]
    ours = output_and_grads(oclear_ext.concept_attention, *low, mask.cuda(), grad_out.to("cuda", dtype), backend=backend)
    plain = output_and_grads(oclear_ext.reference.concept_attention, *low, mask.cuda(), grad_out.to("cuda", dtype))
    for name, o, p, e in zip(("out", "grad_q", "grad_k", "grad_v"), ours, plain, exact):
        err_ours = (o.double().cpu() - e).abs().max().item()
        err_plain = (p.double().cpu() - e).abs().max().item()
        assert err_ours <= 2 * err_plain + 1e-3, f"{name}: ours {err_ours:.3g} vs plain {dtype} {err_plain:.3g}"
    return ours


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("broadcast", [False, True])
def test_cuda_low_precision_within_twice_pytorch_error(dtype, broadcast):
    assert_within_twice_pytorch_error(4, 33, 70, 64, broadcast, dtype, seed=4)


# The tensor-core kernels (backend="tensor_core"; bf16 / fp16, Dh in {16, 32, 64}, whole key rows in
# shared memory): query tiles with ragged edges, key counts off the 16-key tile, and the most keys that fit
# an A100's shared memory too (144 at Dh = 64, 176 at Dh = 32, 208 at Dh = 16), so the path is taken on both.
TC_SHAPES = [(1, 32, 64), (33, 70, 64), (64, 64, 64), (70, 144, 64), (17, 100, 32), (2, 176, 32), (5, 3, 16),
             (9, 208, 16)]


@pytest.mark.parametrize("lq, lk, dh", TC_SHAPES)
@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tensor_core_path_within_twice_pytorch_error(lq, lk, dh, broadcast, dtype):
    tc = assert_within_twice_pytorch_error(3, lq, lk, dh, broadcast, dtype, seed=lq + lk, backend="tensor_core")
    q, k, v, mask = make_attention_inputs(3, 2, lq, lk, dh, broadcast=broadcast, pad_fraction=0.3, empty_rows=1,
                                          seed=lq + lk, dtype=dtype, device="cuda")
    for backend in ("auto", "cuda_core"):  # the default is the CUDA-core kernels
        cores = oclear_ext.concept_attention(q, k, v, mask, backend=backend)
        assert not torch.equal(cores, tc[0]), f"backend={backend!r} ran the same kernels as 'tensor_core'"
    with oclear_ext.concept_attention_backend("tensor_core"):  # the context manager reaches the op
        torch.testing.assert_close(oclear_ext.concept_attention(q, k, v, mask), tc[0], rtol=0, atol=0)


def test_tensor_core_path_partial_gradients_and_empty_rows():
    q, k, v, mask = make_attention_inputs(3, 2, 20, 50, 32, broadcast=True, pad_fraction=0.3, empty_rows=1,
                                          dtype=torch.bfloat16, device="cuda")
    grad_out = torch.randn_like(q)
    full = output_and_grads(oclear_ext.concept_attention, q, k, v, mask, grad_out, backend="tensor_core")
    assert not full[0][0].any() and not full[1][0].any(), "a fully padded row: zero output and zero grad_q"
    for wanted in ("q", "k", "v"):
        leaves = {name: t.detach().requires_grad_(name == wanted) for name, t in zip("qkv", (q, k, v))}
        oclear_ext.concept_attention(leaves["q"], leaves["k"], leaves["v"], mask, backend="tensor_core").backward(grad_out)
        # Same kernels; a shared memory's dK, dV are summed with float32 atomics (order may differ).
        torch.testing.assert_close(leaves[wanted].grad, full["qkv".index(wanted) + 1])


@pytest.mark.parametrize("q_dtype, dh, lk, error, match", [
    (torch.float32, 64, 64, TypeError, r"backend='tensor_core' needs bfloat16 or float16 q, k and v, got"),
    (torch.bfloat16, 80, 64, ValueError, r"backend='tensor_core' needs head_dim \(q.size\(3\)\) in \{16, 32, 64\}, got 80"),
    (torch.float16, 64, 300, ValueError, r"it needs 1 <= keys \(k.size\(2\)\) <= 256, got 300"),
])
def test_tensor_core_errors_name_the_problem(q_dtype, dh, lk, error, match):
    q, k, v, _ = make_attention_inputs(2, 2, 4, lk, dh, dtype=q_dtype, device="cuda")
    with pytest.raises(error, match=match):
        oclear_ext.concept_attention(q, k, v, backend="tensor_core")
    if error is ValueError:  # the shape rules are also the op's own (direct torch.ops callers)
        with pytest.raises(error, match=match):
            torch.ops.oclear.concept_attention_forward(q, k, v, None, 0.125, "tensor_core")


@pytest.mark.parametrize("backend", ["cuda_core", "tensor_core"])
def test_cuda_broadcast_memory_is_never_expanded(backend):
    with oclear_ext.concept_attention_backend(backend):
        assert_shared_memory_not_expanded("cuda", torch.bfloat16)


def test_cuda_autocast_casts_like_by_hand():
    q, k, v, mask = make_attention_inputs(3, 2, 9, 21, 32, broadcast=True, pad_fraction=0.3, empty_rows=1,
                                          dtype=torch.float32, device="cuda", seed=4)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = oclear_ext.concept_attention(*leaves, mask)
        _, lse = torch.ops.oclear.concept_attention_forward(q, k, v, mask, 0.25)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    out.float().sum().backward()
    by_hand = [t.to(torch.bfloat16).detach().requires_grad_(True) for t in (q, k, v)]
    want = oclear_ext.concept_attention(*by_hand, mask)
    want.float().sum().backward()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for got, expected in zip(leaves, by_hand):
        assert got.grad.dtype == torch.float32
        # A shared memory's dK, dV are summed with float32 atomics (order may differ between runs).
        torch.testing.assert_close(got.grad, expected.grad.float(), rtol=1e-2, atol=1e-2)


def test_cuda_fully_padded_rows_and_float64_error():
    q, k, v, mask = make_attention_inputs(2, 2, 4, 6, 32, pad_fraction=0.2, empty_rows=1, dtype=torch.float32, device="cuda")
    out = oclear_ext.concept_attention(q, k, v, mask)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isfinite(out).all()
    with pytest.raises(TypeError, match="on CUDA, q, k and v must be float32, bfloat16 or float16"):
        oclear_ext.concept_attention(q.double(), k.double(), v.double(), mask)
    with pytest.raises(ValueError, match="q, k and v must be on one device"):
        oclear_ext.concept_attention(q, k.cpu(), v, mask)


def test_cuda_opcheck():
    q, k, v, mask = make_attention_inputs(2, 2, 5, 9, 16, broadcast=True, pad_fraction=0.3, dtype=torch.float32, device="cuda")
    torch.library.opcheck(torch.ops.oclear.concept_attention_forward.default,
                          (q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True), mask, 0.25))

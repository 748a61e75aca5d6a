"""CUDA concept attention against the CPU op (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from attention_cases import make_attention_inputs, output_and_grads
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("broadcast", [False, True])
def test_cuda_low_precision_within_twice_pytorch_error(dtype, broadcast):
    q, k, v, mask = make_attention_inputs(4, 2, 33, 70, 64, broadcast=broadcast, pad_fraction=0.3, empty_rows=1, seed=4)
    grad_out = torch.randn_like(q)
    exact = output_and_grads(oclear_ext.reference.concept_attention, q, k, v, mask, grad_out)
    low = [t.to("cuda", dtype) for t in (q, k, v)]
    ours = output_and_grads(oclear_ext.concept_attention, *low, mask.cuda(), grad_out.to("cuda", dtype))
    plain = output_and_grads(oclear_ext.reference.concept_attention, *low, mask.cuda(), grad_out.to("cuda", dtype))
    for name, o, p, e in zip(("out", "grad_q", "grad_k", "grad_v"), ours, plain, exact):
        err_ours = (o.double().cpu() - e).abs().max().item()
        err_plain = (p.double().cpu() - e).abs().max().item()
        assert err_ours <= 2 * err_plain + 1e-3, f"{name}: ours {err_ours:.3g} vs plain {dtype} {err_plain:.3g}"


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

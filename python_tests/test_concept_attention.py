"""Concept attention (CPU) against the plain-PyTorch reference and scaled_dot_product_attention."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from attention_cases import assert_shared_memory_not_expanded, make_attention_inputs, output_and_grads
from hypothesis import given, settings
from hypothesis import strategies as st

import oclear_ext
from oclear_ext import reference

HEAD_DIMS = [16, 32, 64, 80, 128]


@settings(max_examples=int(os.environ.get("OCLEAR_HYPOTHESIS_EXAMPLES", "40")))
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 3),
    lq=st.integers(1, 64),
    lk=st.integers(1, 512),
    dh=st.sampled_from(HEAD_DIMS),
    broadcast=st.booleans(),
    pad_fraction=st.sampled_from([0.0, 0.3, 0.9]),
    empty_rows=st.integers(0, 1),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_float64(b, h, lq, lk, dh, broadcast, pad_fraction, empty_rows, seed):
    q, k, v, mask = make_attention_inputs(b, h, lq, lk, dh, broadcast=broadcast, pad_fraction=pad_fraction,
                                          empty_rows=empty_rows, seed=seed)
    grad_out = torch.randn(b, h, lq, dh, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    got = output_and_grads(oclear_ext.concept_attention, q, k, v, mask, grad_out)
    want = output_and_grads(reference.concept_attention, q, k, v, mask, grad_out)
    for name, a, e in zip(("out", "grad_q", "grad_k", "grad_v"), got, want):
        assert a.shape == e.shape, name
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


@settings(max_examples=int(os.environ.get("OCLEAR_HYPOTHESIS_EXAMPLES", "40")))
@given(
    b=st.integers(1, 3),
    lq=st.integers(1, 64),
    lk=st.integers(1, 512),
    dh=st.sampled_from(HEAD_DIMS),
    broadcast=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_sdpa_float32(b, lq, lk, dh, broadcast, seed):
    # SDPA wants the mask as "True = attend", expanded keys, and returns NaN for a row without keys:
    # compare the rows that have keys; the reference covers the others.
    q, k, v, mask = make_attention_inputs(b, 2, lq, lk, dh, broadcast=broadcast, pad_fraction=0.3,
                                          dtype=torch.float32, seed=seed)
    mask[:, 0] = False  # every row keeps a key
    grad_out = torch.randn(b, 2, lq, dh, generator=torch.Generator().manual_seed(seed))

    def sdpa(q_, k_, v_, m_):
        kb, vb = k_.expand(b, -1, -1, -1), v_.expand(b, -1, -1, -1)
        return F.scaled_dot_product_attention(q_, kb, vb, attn_mask=(~m_)[:, None, None, :])

    got = output_and_grads(oclear_ext.concept_attention, q, k, v, mask, grad_out)
    want = output_and_grads(sdpa, q, k, v, mask, grad_out)
    scale = math.sqrt(lk) if broadcast else 1.0  # a shared memory's gradient sums over the batch
    for name, a, e in zip(("out", "grad_q", "grad_k", "grad_v"), got, want):
        atol = 2e-5 * (scale if name in ("grad_k", "grad_v") else 1.0) * b
        torch.testing.assert_close(a, e, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")


def test_fully_padded_rows_are_zero_with_zero_gradient():
    q, k, v, mask = make_attention_inputs(3, 2, 5, 9, 16, pad_fraction=0.4, empty_rows=1, seed=7)
    ql, kl, vl = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = oclear_ext.concept_attention(ql, kl, vl, mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.equal(ql.grad[0], torch.zeros_like(ql.grad[0]))
    assert torch.equal(kl.grad[0], torch.zeros_like(kl.grad[0])) and torch.equal(vl.grad[0], torch.zeros_like(vl.grad[0]))
    # Padding keys of the other batch elements get exactly no gradient either.
    padded = mask[1:, None, :, None].expand_as(kl.grad[1:])
    assert (kl.grad[1:][padded] == 0).all() and (vl.grad[1:][padded] == 0).all()
    _, lse = torch.ops.oclear.concept_attention_forward(q, k, v, mask, 0.25)
    assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1:]).all()


def test_broadcast_memory_equals_expanded_memory():
    q, k, v, mask = make_attention_inputs(4, 3, 6, 20, 32, broadcast=True, pad_fraction=0.3, seed=3)
    grad_out = torch.randn_like(q)
    shared = output_and_grads(oclear_ext.concept_attention, q, k, v, mask, grad_out)
    ke, ve = k.expand(4, -1, -1, -1).contiguous(), v.expand(4, -1, -1, -1).contiguous()
    expanded = output_and_grads(oclear_ext.concept_attention, q, ke, ve, mask, grad_out)
    torch.testing.assert_close(shared[0], expanded[0], rtol=0, atol=0)
    torch.testing.assert_close(shared[1], expanded[1], rtol=0, atol=0)
    torch.testing.assert_close(shared[2], expanded[2].sum(0, keepdim=True), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shared[3], expanded[3].sum(0, keepdim=True), rtol=1e-12, atol=1e-12)


def test_broadcast_memory_is_never_expanded():
    assert_shared_memory_not_expanded("cpu", torch.float32)


def test_strided_inputs_and_explicit_scale():
    # Heads split by a view (B, L, H, Dh) -> (B, H, L, Dh): read in place, same result as contiguous.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 3, 16, dtype=torch.float64, generator=g).transpose(1, 2)
    y = torch.randn(2, 11, 3, 16, dtype=torch.float64, generator=g).transpose(1, 2)
    z = torch.randn(2, 3, 11, 32, dtype=torch.float64, generator=g)[..., ::2]  # non-unit last stride: copied
    out = oclear_ext.concept_attention(x, y, z, scale=0.7)
    want = reference.concept_attention(x.contiguous(), y.contiguous(), z.contiguous(), scale=0.7)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert out.is_contiguous()


def test_empty_shapes():
    q = torch.randn(0, 2, 3, 8)
    k = torch.randn(0, 2, 4, 8)
    assert oclear_ext.concept_attention(q, k, k).shape == (0, 2, 3, 8)
    q = torch.randn(2, 2, 3, 8, requires_grad=True)
    k = torch.randn(2, 2, 0, 8, requires_grad=True)
    out = oclear_ext.concept_attention(q, k, k)
    assert torch.equal(out, torch.zeros(2, 2, 3, 8))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("broadcast", [False, True])
def test_low_precision_within_twice_pytorch_error(dtype, broadcast):
    # The low-precision rule (docs/design.md#tests): error against the float64 reference at most twice plain PyTorch's own
    # low-precision error (the reference run in `dtype`) plus a small atol.
    q, k, v, mask = make_attention_inputs(4, 2, 17, 70, 64, broadcast=broadcast, pad_fraction=0.3, empty_rows=1, seed=11)
    grad_out = torch.randn_like(q)
    exact = output_and_grads(reference.concept_attention, q, k, v, mask, grad_out)
    low = [t.to(dtype) for t in (q, k, v)]
    ours = output_and_grads(oclear_ext.concept_attention, *low, mask, grad_out.to(dtype))
    plain = output_and_grads(reference.concept_attention, *low, mask, grad_out.to(dtype))
    for name, o, p, e in zip(("out", "grad_q", "grad_k", "grad_v"), ours, plain, exact):
        assert o.dtype == dtype, name
        err_ours = (o.double() - e).abs().max().item()
        err_plain = (p.double() - e).abs().max().item()
        assert err_ours <= 2 * err_plain + 1e-3, f"{name}: ours {err_ours:.3g} vs plain {dtype} {err_plain:.3g}"


def test_gradcheck_float64_tiny():
    q, k, v, mask = make_attention_inputs(2, 2, 3, 5, 4, pad_fraction=0.3, empty_rows=1, seed=2)
    for kk, vv in ((k, v), (k[:1], v[:1])):
        inputs = tuple(t.clone().requires_grad_(True) for t in (q, kk, vv))
        assert torch.autograd.gradcheck(lambda a, b_, c: oclear_ext.concept_attention(a, b_, c, mask), inputs)


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_every_instruction_set_path(isa):
    # The kernels are compiled for AVX-512, AVX2 and the baseline; torch's CPU capability picks one.
    # Run the others in a subprocess (the capability is read once per process).
    code = (
        "import torch, oclear_ext\n"
        "import oclear_ext._ops  # loads the kernels (torch.ops.oclear.* below)\n"
        "from oclear_ext import reference\n"
        "import sys; sys.path.insert(0, 'python_tests')\n"
        "from attention_cases import make_attention_inputs, output_and_grads\n"
        "print(torch.ops.oclear._concept_attention_cpu_isa())\n"
        "oclear_ext.cpu_output_cache.set_limit(1 << 30)  # the second call below then runs on reused blocks\n"
        "for bc in (False, True):\n"
        "    for dt in (torch.float64, torch.float32):\n"
        "        q, k, v, m = make_attention_inputs(3, 2, 70, 130, 80, broadcast=bc, pad_fraction=0.3, empty_rows=1, dtype=dt, seed=1)\n"
        "        g = torch.randn_like(q)\n"
        "        got = output_and_grads(oclear_ext.concept_attention, q, k, v, m, g)\n"
        "        want = output_and_grads(reference.concept_attention, q, k, v, m, g)\n"
        "        tol = 1e-10 if dt == torch.float64 else 1e-4\n"
        "        for a, e in zip(got, want): torch.testing.assert_close(a, e, rtol=tol, atol=tol)\n"
        "q, k, v, m = make_attention_inputs(8, 4, 64, 64, 128, pad_fraction=0.3, dtype=torch.float32, seed=2)\n"
        "g = torch.randn_like(q)\n"
        "want = output_and_grads(reference.concept_attention, q, k, v, m, g)\n"
        "for _ in range(2):  # the second call writes into reused cache blocks, with non-temporal stores\n"
        "    got = output_and_grads(oclear_ext.concept_attention, q, k, v, m, g)\n"
        "    for a, e in zip(got, want): torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)\n"
        "    del got, a, e\n"
        "assert oclear_ext.cpu_output_cache.stats().hits >= 4, oclear_ext.cpu_output_cache.stats()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split()
    cpu_has_avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    assert lines[0] == ("baseline" if isa == "default" or not cpu_has_avx2 else "avx2")
    assert lines[-1] == "ok"

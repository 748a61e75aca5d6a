"""Fused margin softmax on CUDA: parity with the CPU op and the reference, op conventions, debug checks.

Skipped without CUDA. `OCLEAR_CUDA_TEST_DEVICE=cpu` runs the same test code against the CPU kernels
(a dry run of the test logic on a machine without GPU: the CUDA-only switches then do nothing).

Tiny class chunks (cuda_cases.class_chunk: the ops' class_chunk argument through
oclear_ext.margin_softmax_options) make small problems cross many chunk edges; the debug switch
OCLEAR_CUDA_POISON=1 (monkeypatch) starts every output and scratch buffer as NaN (unwritten elements show).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from cuda_cases import DEVICE, class_chunk, cuda_only, skip_without_device
from margin_cases import (ARCFACE, COMBINED, COSFACE, MARGINS, SPHEREFACE, check_compile_matches_eager, make_inputs,
                          natural_atols)

import oclear_ext
from oclear_ext import reference
from oclear_ext._ops.margin_softmax import MarginSettings

pytestmark = skip_without_device

FORWARD = torch.ops.oclear.margin_softmax_forward.default
BACKWARD = torch.ops.oclear.margin_softmax_backward.default
LOW_PRECISION = (torch.bfloat16, torch.float16)


def run(fn, x, w, labels, device, **kwargs):
    """(loss, dL/dx, dL/dw) of fn on `device`, returned on the CPU; 'none' gets a fixed upstream ramp."""
    x = x.detach().to(device).requires_grad_(True)
    w = w.detach().to(device).requires_grad_(True)
    loss = fn(x, w, labels.to(device), **kwargs)
    upstream = torch.ones((), dtype=loss.dtype, device=device) if loss.dim() == 0 else torch.linspace(
        0.5, 1.5, loss.numel(), dtype=loss.dtype, device=device)
    (loss * upstream).sum().backward()
    return tuple(t.detach().cpu() for t in (loss, x.grad, w.grad))


def max_error(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_plain_rule(got, plain, want, atols):
    """The low-precision rule (docs/design.md#tests): error vs the float64 reference <= 2 x plain PyTorch's own error + atol."""
    for name, g, p, ref, atol in zip(("loss", "grad x", "grad w"), got, plain, want, atols):
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        err, plain_err = max_error(g, ref), max_error(p, ref)
        assert err <= 2 * plain_err + atol, f"{name}: error {err:.3g} > 2 x plain {plain_err:.3g} + {atol:.3g}"


def edge_labels(labels, c, t):
    """Overwrites the first labels with class ids at chunk edges (t per chunk) and the last class."""
    edges = [0, c - 1]
    if t is not None:
        edges += [e for k in range(1, 4) for e in (k * t - 1, k * t) if e < c]
    m = min(len(labels), len(edges))
    labels[:m] = torch.tensor(edges[:m])
    return labels


@cuda_only
def test_extension_was_built_with_cuda_kernels():
    assert oclear_ext.build_info["with_cuda"], f"CUDA is available but oclear_ext was built without it: {oclear_ext.build_info}"


@given(
    n=st.integers(1, 40),
    c=st.integers(1, 300),
    d=st.integers(2, 48),
    t=st.sampled_from([None, 1, 7, 64, 256]),
    margin=st.sampled_from(MARGINS),
    scale=st.sampled_from([1.0, 16.0, 64.0]),
    arcface_grad=st.sampled_from(["exact", "straight_through"]),
    interclass_filter=st.sampled_from([None, -0.3, 0.2]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    ignore_fraction=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_float64_matches_cpu_op(n, c, d, t, margin, scale, arcface_grad, interclass_filter, reduction,
                                ignore_fraction, seed):
    # float64 on both sides: the CUDA kernels must agree with the CPU kernels to rounding.
    x, w, labels = make_inputs(n, c, d, seed=seed, ignore_fraction=ignore_fraction)
    labels = edge_labels(labels, c, t)
    kwargs = dict(scale=scale, margin=margin, arcface_grad=arcface_grad, interclass_filter=interclass_filter,
                  reduction=reduction)
    with class_chunk(t):
        got = run(oclear_ext.margin_softmax_loss, x, w, labels, DEVICE, **kwargs)
    want = run(oclear_ext.margin_softmax_loss, x, w, labels, "cpu", **kwargs)
    for name, a, b, atol in zip(("loss", "grad x", "grad w"), got, want, natural_atols(x, w, scale, 1e-12)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=atol, msg=lambda m: f"{name}: {m}")


@given(
    n=st.integers(1, 48),
    c=st.integers(1, 600),
    d=st.sampled_from([2, 3, 17, 64, 130]),
    t=st.sampled_from([None, 5, 128]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    margin=st.sampled_from(MARGINS),
    interclass_filter=st.sampled_from([None, 0.2]),
    seed=st.integers(0, 2**16),
)
def test_float32_and_16_bit_within_twice_plain_pytorch(n, c, d, t, dtype, margin, interclass_filter, seed):
    if dtype != torch.float32:
        # In 16 bits, D <= 3 puts cosines near +-1 (acos ill-conditioned) and the filter's threshold
        # within input rounding of many cosines: both errors are then luck, not kernel quality.
        assume(d >= 17 and interclass_filter is None)
    x, w, labels = make_inputs(n, c, d, seed=seed, ignore_fraction=0.1)
    labels = edge_labels(labels, c, t)
    kwargs = dict(scale=32.0, margin=margin, interclass_filter=interclass_filter)
    want = run(reference.margin_softmax_loss, x, w, labels, "cpu", **kwargs)  # float64 ground truth
    plain = run(reference.margin_softmax_loss, x.to(dtype), w.to(dtype), labels, DEVICE, **kwargs)
    with class_chunk(t):
        got = run(oclear_ext.margin_softmax_loss, x.to(dtype), w.to(dtype), labels, DEVICE, **kwargs)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    eps = 1e-5 if dtype == torch.float32 else 2e-3
    atols = tuple(a + eps * r.abs().max().item() for a, r in zip(natural_atols(x, w, 32.0, eps), want))
    assert_within_plain_rule(got, plain, want, atols)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("margin", [COSFACE, ARCFACE])
def test_realistic_shape_within_twice_plain_pytorch(dtype, margin):
    # A training-like shape over several default-size chunks.
    x, w, labels = make_inputs(96, 9000, 64, seed=11, ignore_fraction=0.05)
    want = run(reference.margin_softmax_loss, x, w, labels, "cpu", margin=margin)
    plain = run(reference.margin_softmax_loss, x.to(dtype), w.to(dtype), labels, DEVICE, margin=margin)
    got = run(oclear_ext.margin_softmax_loss, x.to(dtype), w.to(dtype), labels, DEVICE, margin=margin)
    assert got[0].dtype == torch.float32
    assert_within_plain_rule(got, plain, want, tuple(1e-3 * r.abs().max().item() for r in want))


@pytest.mark.parametrize("t", [None, 3])
def test_class_block_matches_cpu_with_labels_at_shard_edges(t):
    # A class shard [40, 97) of 150: labels just outside, on and inside both shard edges.
    with class_chunk(t):
        check_class_block()


def check_class_block():
    x, w, _ = make_inputs(10, 57, 12, seed=3)
    labels = torch.tensor([39, 40, 41, 95, 96, 97, 0, 149, -100, 60])
    args = (40, 150, *MarginSettings(24.0, COMBINED, "exact", 0.5, -100).op_args())
    got = FORWARD(x.to(DEVICE), w.to(DEVICE), labels.to(DEVICE), *args)
    want = FORWARD(x, w, labels, *args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12)
    assert (got[1].cpu()[[0, 5, 6, 7, 8]] == 0).all()  # rows whose target lies outside the shard
    g = torch.linspace(0.2, 1.0, 10, dtype=torch.float64)
    for need_x, need_w in [(True, True), (True, False), (False, True)]:
        bgot = BACKWARD(g.to(DEVICE), (-g).to(DEVICE), x.to(DEVICE), w.to(DEVICE), labels.to(DEVICE),
                        got[0], got[2], *args, need_x, need_w)
        bwant = BACKWARD(g, -g, x, w, labels, want[0], want[2], *args, need_x, need_w)
        for a, b in zip(bgot, bwant):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("margin", [COSFACE, ARCFACE, SPHEREFACE, (1.0, 3.0, 0.0)])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_cos_exactly_plus_minus_one_is_finite(dtype, margin, sign):
    w = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]], dtype=dtype)
    x = sign * torch.tensor([[1.0, 0.0, 0.0], [0.0, 5.0, 0.0]], dtype=dtype)
    labels = torch.tensor([0, 1])
    got = run(oclear_ext.margin_softmax_loss, x, w, labels, DEVICE, margin=margin)
    for t in got:
        assert torch.isfinite(t).all()
    want = run(oclear_ext.margin_softmax_loss, x, w, labels, "cpu", margin=margin)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    if dtype == torch.float64:
        # the floored exact derivative is large here (m1 sin(m2) / 1e-4): compare relative to it
        for a, b in zip(got[1:], want[1:]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * max(1.0, b.abs().max().item()))


def test_labels_above_float16_range_and_default_chunks():
    c = 70_000
    x, w, _ = make_inputs(6, c, 16, dtype=torch.float32, seed=3)
    labels = torch.tensor([65_504, 65_505, 66_000, 69_999, 0, 65_536])
    got = run(oclear_ext.margin_softmax_loss, x, w, labels, DEVICE, margin=COSFACE)
    want = run(oclear_ext.margin_softmax_loss, x, w, labels, "cpu", margin=COSFACE)
    for a, b, atol in zip(got, want, natural_atols(x, w, 64.0, 1e-5)):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=atol)


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_batches(n):
    x, w, labels = make_inputs(max(n, 1), 20, 5, seed=4)
    x, labels = x[:n], labels[:n]
    got = run(oclear_ext.margin_softmax_loss, x, w, labels, DEVICE, reduction="none")
    want = run(oclear_ext.margin_softmax_loss, x, w, labels, "cpu", reduction="none")
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@class_chunk(16)
def test_non_contiguous_inputs():
    x_big, w_big, labels = make_inputs(20, 90, 30, seed=4)
    x_big, w_big = x_big.to(DEVICE), w_big.to(DEVICE)
    x = x_big[:, ::2]  # strided columns
    w = w_big.t().contiguous().t()[:, 5:20]  # column-major view, sliced
    labels_nc = torch.stack([labels, labels], 1).to(DEVICE)[:, 0]  # strided on the device (.to() would compact it)
    assert not x.is_contiguous() and not w.is_contiguous() and not labels_nc.is_contiguous()
    got = run(oclear_ext.margin_softmax_loss, x, w, labels_nc, DEVICE, margin=COMBINED)
    want = run(oclear_ext.margin_softmax_loss, x.cpu().contiguous(), w.cpu().contiguous(), labels, "cpu", margin=COMBINED)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *LOW_PRECISION])
@class_chunk(7)
def test_poisoned_buffers_are_fully_overwritten(monkeypatch, dtype):
    # Every output and scratch buffer starts as NaN: a single unwritten element would surface.
    x, w, labels = make_inputs(13, 61, 9, seed=5, ignore_fraction=0.3)
    x, w = x.to(dtype), w.to(dtype)
    clean = run(oclear_ext.margin_softmax_loss, x, w, labels, DEVICE, margin=COMBINED, reduction="none")
    monkeypatch.setenv("OCLEAR_CUDA_POISON", "1")
    poisoned = run(oclear_ext.margin_softmax_loss, x, w, labels, DEVICE, margin=COMBINED, reduction="none")
    for a, b in zip(poisoned, clean):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)  # same computation; cuBLAS may pick another algorithm
    # The private ops' own outputs too (lse, target, w_inv; both gradients, each alone).
    args = (0, 61, *MarginSettings(16.0, ARCFACE).op_args())
    xd, wd, ld = x.to(DEVICE), w.to(DEVICE), labels.to(DEVICE)
    lse, target, w_inv = FORWARD(xd, wd, ld, *args)
    for t in (lse, target, w_inv):
        assert torch.isfinite(t).all()
    g = torch.ones(13, dtype=lse.dtype, device=DEVICE)
    for need_x, need_w in [(True, False), (False, True)]:
        gx, gw = BACKWARD(g, -g, xd, wd, ld, lse, w_inv, *args, need_x, need_w)
        assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
        assert gx.numel() == (13 * 9 if need_x else 0) and gw.numel() == (61 * 9 if need_w else 0)


@pytest.mark.parametrize("bad, index", [(50, 2), (-1, 1)])
def test_label_out_of_range_raises(bad, index):
    x, w, _ = make_inputs(4, 50, 8, dtype=torch.float32, seed=6)
    labels = torch.tensor([0, 3, 49, -100])
    labels[index] = bad
    with pytest.raises(IndexError, match=rf"labels\[{index}\] = {bad} is out of range: expected a class id in \[0, 50\) "
                                         r"or ignore_index = -100"):
        oclear_ext.margin_softmax_loss(x.to(DEVICE), w.to(DEVICE), labels.to(DEVICE))


@cuda_only
def test_label_check_switched_off_is_memory_safe():
    # check_labels=False skips the check (and its host sync); a bad label then matches no class,
    # so the row's loss is its log-sum-exp with no target, and nothing is read out of bounds.
    x, w, _ = make_inputs(4, 50, 8, seed=6)
    labels = torch.tensor([0, 3, 10**9, -100], device=DEVICE)
    args = (0, 50, *MarginSettings(16.0, COSFACE, check_labels=False).op_args())
    lse, target, _ = FORWARD(x.to(DEVICE), w.to(DEVICE), labels, *args)
    assert torch.isfinite(lse).all() and target[2].item() == 0.0 and target[0].item() != 0.0


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_float32_honours_allow_tf32(allow_tf32):
    # The chunk GEMMs go through ATen, which uses TF32 exactly when the user allows it; either way the
    # result is within the 2x-plain rule of plain PyTorch under the same setting.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        x, w, labels = make_inputs(64, 3000, 96, seed=12, ignore_fraction=0.05)
        want = run(reference.margin_softmax_loss, x, w, labels, "cpu", margin=ARCFACE)
        plain = run(reference.margin_softmax_loss, x.float(), w.float(), labels, DEVICE, margin=ARCFACE)
        got = run(oclear_ext.margin_softmax_loss, x.float(), w.float(), labels, DEVICE, margin=ARCFACE)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert_within_plain_rule(got, plain, want, tuple(1e-4 * r.abs().max().item() for r in want))


@cuda_only
def test_mixed_devices_raise():
    x, w, labels = make_inputs(4, 10, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"must be on one device"):
        oclear_ext.margin_softmax_loss(x.to(DEVICE), w, labels.to(DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@class_chunk(4)
def test_opcheck(dtype):
    x, w, labels = make_inputs(6, 11, 5, dtype=dtype, seed=3, ignore_fraction=0.2)
    settings = MarginSettings(16.0, COMBINED, "exact", 0.3, -100).op_args()
    xd, wd, ld = x.to(DEVICE).requires_grad_(True), w.to(DEVICE).requires_grad_(True), labels.to(DEVICE)
    torch.library.opcheck(FORWARD, (xd, wd, ld, 0, 11, *settings))
    lse, _, w_inv = FORWARD(xd.detach(), wd.detach(), ld, 0, 11, *settings)
    g = torch.rand(6, dtype=lse.dtype, device=DEVICE)
    for need_x, need_w in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(BACKWARD, (g, -g, xd.detach(), wd.detach(), ld, lse, w_inv, 0, 11, *settings, need_x, need_w))


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    check_compile_matches_eager(DEVICE)


def test_module_on_device_matches_cpu():
    torch.manual_seed(0)
    module = oclear_ext.nn.MarginSoftmaxLoss(500, 32, margin=ARCFACE, scale=30.0).double()
    x = torch.randn(16, 32, dtype=torch.float64)
    labels = torch.randint(0, 500, (16,))
    loss_cpu = module(x, labels)
    loss_cpu.backward()
    grad_cpu = module.weight.grad.clone()
    module.weight.grad = None
    module.to(DEVICE)
    loss_dev = module(x.to(DEVICE), labels.to(DEVICE))
    loss_dev.backward()
    torch.testing.assert_close(loss_dev.cpu(), loss_cpu, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(module.weight.grad.cpu(), grad_cpu, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
@cuda_only
def test_indices_past_2_to_the_31():
    # C x D > 2^31 elements of weight (4.4 GB in bfloat16): row offsets of the weight overflow int32.
    n, c, d = 64, 4_200_000, 520
    g = torch.Generator(device=DEVICE).manual_seed(0)
    w = torch.randn(c, d, device=DEVICE, dtype=torch.bfloat16, generator=g)
    x = torch.randn(n, d, device=DEVICE, dtype=torch.bfloat16, generator=g)
    labels = torch.randint(0, c, (n,), device=DEVICE, generator=g)
    labels[:4] = torch.tensor([c - 1, c - 2, 4_130_000, 0])
    s = MarginSettings(64.0, COSFACE).op_args()
    lse, target, w_inv = FORWARD(x, w, labels, 0, c, *s)
    torch.testing.assert_close(w_inv[-1000:], w[-1000:].float().norm(dim=1).reciprocal(), rtol=1e-5, atol=0)
    # lse by plain blocks of classes, in float32 from the same bfloat16 x^ the GEMMs use
    x_hat = torch.nn.functional.normalize(x.float(), dim=1).to(torch.bfloat16)
    parts, cos_target = [], torch.empty(n, device=DEVICE)
    for c0 in range(0, c, 500_000):
        block = w[c0:c0 + 500_000]
        cos = (x_hat.float() @ block.float().t()) * w_inv[c0:c0 + 500_000]
        cos = cos.clamp(-1, 1)
        inside = (labels >= c0) & (labels < c0 + block.shape[0])
        rows = inside.nonzero().squeeze(1)
        cos_target[rows] = cos[rows, labels[rows] - c0]
        logits = 64.0 * cos
        logits[rows, labels[rows] - c0] = 64.0 * (cos[rows, labels[rows] - c0] - 0.4)
        parts.append(torch.logsumexp(logits, dim=1))
    torch.testing.assert_close(lse, torch.logsumexp(torch.stack(parts), 0), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(target, 64.0 * (cos_target - 0.4), rtol=1e-4, atol=1e-3)

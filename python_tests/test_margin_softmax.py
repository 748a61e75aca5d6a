"""Fused margin softmax (CPU) against the plain-PyTorch reference: values and both gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from margin_cases import (
    ARCFACE,
    COMBINED,
    COSFACE,
    MARGINS,
    SPHEREFACE,
    assert_close_all,
    natural_atols,
    fused_and_reference,
    loss_and_grads,
    make_inputs,
)

import oclear_ext
from oclear_ext import reference


def _max_error(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@given(
    n=st.integers(1, 40),
    c=st.integers(1, 300),
    d=st.integers(2, 40),  # D = 1 puts every cosine at +-1, acos's singular point: see test_tiny_shapes
    margin=st.sampled_from(MARGINS),
    scale=st.sampled_from([1.0, 16.0, 64.0]),
    arcface_grad=st.sampled_from(["exact", "straight_through"]),
    interclass_filter=st.sampled_from([None, -0.3, 0.2, 0.9]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    ignore_fraction=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_float64(n, c, d, margin, scale, arcface_grad, interclass_filter, reduction, ignore_fraction, seed):
    x, w, labels = make_inputs(n, c, d, seed=seed, ignore_fraction=ignore_fraction)
    got, want = fused_and_reference(
        x, w, labels, scale=scale, margin=margin, arcface_grad=arcface_grad,
        interclass_filter=interclass_filter, reduction=reduction,
    )
    assert_close_all(got, want, rtol=1e-9, atol=natural_atols(x, w, scale, 1e-12))


@given(
    n=st.integers(1, 64),
    c=st.integers(1, 600),
    d=st.sampled_from([2, 3, 17, 64, 130]),  # D = 1 (all cos = +-1, dW = 0 exactly) is float64-tested
    margin=st.sampled_from(MARGINS),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_float32(n, c, d, margin, seed):
    # The low-precision rule (docs/design.md#tests): error against the float64 reference <= 2 x plain PyTorch's own float32 error
    # + a small atol. (A float32-vs-float32 comparison would fail where both are ill-conditioned, e.g. the
    # exact ArcFace derivative m1 sin(theta + m) / sin(theta) for an embedding nearly parallel to its centre.)
    x, w, labels = make_inputs(n, c, d, seed=seed, ignore_fraction=0.1)
    want = loss_and_grads(reference.margin_softmax_loss, x, w, labels, margin=margin, scale=32.0)
    x32, w32 = x.float(), w.float()
    plain = loss_and_grads(reference.margin_softmax_loss, x32, w32, labels, margin=margin, scale=32.0)
    got = loss_and_grads(oclear_ext.margin_softmax_loss, x32, w32, labels, margin=margin, scale=32.0)
    for name, g, p, ref, atol in zip(("loss", "grad x", "grad w"), got, plain, want, natural_atols(x, w, 32.0, 1e-5)):
        assert _max_error(g, ref) <= 2 * _max_error(p, ref) + atol, name


@pytest.mark.parametrize("n, c", [(3, 5000), (300, 4000), (1, 8193)])
def test_several_class_chunks_and_labels_at_chunk_edges(n, c):
    # The CPU kernel walks the classes in chunks of 256..4096; put labels on chunk boundaries.
    x, w, labels = make_inputs(n, c, 24, seed=1)
    edges = torch.tensor([0, 255, 256, 1727, 1728, 4095, 4096, c - 1]) % c
    labels[: min(n, len(edges))] = edges[: min(n, len(edges))]
    got, want = fused_and_reference(x, w, labels, margin=COMBINED)
    assert_close_all(got, want, rtol=1e-9, atol=1e-12)


def test_all_rows_of_one_class():
    x, w, _ = make_inputs(50, 70, 8, seed=2)
    labels = torch.full((50,), 13)
    got, want = fused_and_reference(x, w, labels, margin=ARCFACE)
    assert_close_all(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_labels_above_float16_range(dtype):
    # Class ids above 65,504 (float16's max) must never pass through a half-precision value.
    c = 70_000
    x, w, _ = make_inputs(6, c, 16, dtype=dtype, seed=3)
    labels = torch.tensor([65_504, 65_505, 66_000, 69_999, 0, 65_536])
    got, want = fused_and_reference(x, w, labels, margin=COSFACE)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-4, atol=natural_atols(x, w, 64.0, 1e-5))
    assert_close_all(got, want, **tol)


def test_non_contiguous_inputs():
    x_big, w_big, labels = make_inputs(20, 90, 30, seed=4)
    x = x_big[:, ::2]  # strided columns
    w = w_big.t().contiguous().t()[:, 5:20]  # column-major view, sliced
    labels_nc = torch.stack([labels, labels], 1)[:, 0]
    assert not x.is_contiguous() and not w.is_contiguous() and not labels_nc.is_contiguous()
    got, want = fused_and_reference(x, w, labels_nc, margin=COMBINED)
    assert_close_all(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n, c, d", [(1, 1, 1), (1, 7, 1), (5, 1, 3), (2, 2, 2)])
def test_tiny_shapes(n, c, d):
    # With D = 1 every cosine is exactly +-1, where acos is ill-conditioned: a 1e-16 rounding difference
    # in the cosine (the kernel computes (x^ . w) / |w|, the reference x^ . w^) moves theta by
    # sqrt(2e-16) ~ 1.5e-8, so the loss agrees to scale * 1e-8, not to 1e-12.
    for seed in range(5):
        x, w, labels = make_inputs(n, c, d, seed=seed)
        tol = dict(rtol=1e-6, atol=64.0 * 3e-8) if d == 1 else dict(rtol=1e-9, atol=natural_atols(x, w, 64.0, 1e-12))
        for margin in MARGINS:
            got, want = fused_and_reference(x, w, labels, margin=margin, reduction="none")
            assert_close_all(got, want, **tol)


@pytest.mark.parametrize("margin", [COSFACE, ARCFACE, SPHEREFACE, COMBINED, (1.0, 3.0, 0.0)])
@pytest.mark.parametrize("arcface_grad", ["exact", "straight_through"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_cos_exactly_plus_minus_one_is_finite(margin, arcface_grad, sign):
    # Embeddings parallel (cos = +1) or anti-parallel (cos = -1) to their class centre: theta = 0 or pi,
    # where the exact ArcFace derivative divides by sin(theta) = 0 (floored in the kernels).
    for dtype in (torch.float32, torch.float64):
        w = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]], dtype=dtype)
        x = sign * torch.tensor([[1.0, 0.0, 0.0], [0.0, 5.0, 0.0]], dtype=dtype)
        labels = torch.tensor([0, 1])
        (loss, gx, gw), (rl, rgx, rgw) = fused_and_reference(x, w, labels, margin=margin, arcface_grad=arcface_grad)
        for t in (loss, gx, gw):
            assert torch.isfinite(t).all()
        if dtype == torch.float64:
            # At sin(theta) = 0 the floored derivative is large (m1 sin(m2) / 1e-4): compare relative to it.
            atols = tuple(1e-9 * max(1.0, r.abs().max().item()) for r in (rl, rgx, rgw))
            assert_close_all((loss, gx, gw), (rl, rgx, rgw), rtol=1e-9, atol=atols)
        else:  # float32 gradients here are an exact cancellation of ~1e5-sized terms: rounding noise
            torch.testing.assert_close(loss, rl, rtol=1e-5, atol=1e-5)


def test_sphereface_gradient_at_cos_one_is_its_limit_not_the_floor():
    # d psi / d cos = m1 sin(m1 theta) / sin(theta) -> m1^2 as theta -> 0 (finite, unlike ArcFace's).
    from oclear_ext.reference.margin_softmax import target_cos_grad

    c = torch.tensor([1.0, 1.0 - 1e-12, 1.0 - 1e-6], dtype=torch.float64)
    torch.testing.assert_close(target_cos_grad(c, 4.0, 0.0), torch.full_like(c, 16.0), rtol=1e-4, atol=0)
    # and the fused kernels agree with the reference there (x parallel to its class centre):
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    x = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    got, want = fused_and_reference(x, w, torch.tensor([0]), margin=(4.0, 0.0, 0.0), scale=2.0)
    assert_close_all(got, want, rtol=1e-9, atol=1e-12)


def test_target_logit_never_rises_with_the_angle():
    # Past m1 * theta + m2 = pi the target logit continues monotonically (no rebound of cos).
    w = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    thetas = torch.linspace(0, math.pi, 400, dtype=torch.float64)
    x = torch.stack([torch.cos(thetas), torch.sin(thetas)], 1)
    labels = torch.zeros(400, dtype=torch.long)
    for margin in (ARCFACE, SPHEREFACE, COMBINED, (2.5, 0.5, 0.1)):
        # With one class the loss is 0; the target logit is what we check, via the second class trick:
        w2 = torch.cat([w, torch.tensor([[0.0, 0.0]], dtype=torch.float64) + 1e-300], 0)
        per_row = oclear_ext.margin_softmax_loss(x, w2, labels, scale=1.0, margin=margin, reduction="none")
        # loss = log(exp(z_t) + exp(z_neg)) - z_t is decreasing in z_t: it must not decrease as theta grows.
        assert (per_row.diff() >= -1e-12).all(), margin


def test_ignored_rows_contribute_nothing():
    x, w, labels = make_inputs(30, 40, 8, seed=6)
    labels[::3] = -100
    loss, gx, _ = loss_and_grads(oclear_ext.margin_softmax_loss, x, w, labels, reduction="mean")
    kept = labels != -100
    loss_kept, _, _ = loss_and_grads(oclear_ext.margin_softmax_loss, x[kept], w, labels[kept], reduction="mean")
    torch.testing.assert_close(loss, loss_kept)
    assert (gx[~kept] == 0).all()


def test_custom_ignore_index_that_is_a_valid_class_id():
    x, w, labels = make_inputs(12, 10, 5, seed=7)
    labels[:4] = 3
    got, want = fused_and_reference(x, w, labels, ignore_index=3)
    assert_close_all(got, want, rtol=1e-9, atol=1e-12)
    assert got[0].item() == pytest.approx(want[0].item())


def test_fully_ignored_batch_has_zero_mean_and_zero_gradient():
    x, w, _ = make_inputs(4, 6, 3, seed=8)
    labels = torch.full((4,), -100)
    loss, gx, gw = loss_and_grads(oclear_ext.margin_softmax_loss, x, w, labels)
    assert loss.item() == 0.0 and (gx == 0).all() and (gw == 0).all()


def test_empty_batch():
    x, w, _ = make_inputs(1, 6, 3)
    out = oclear_ext.margin_softmax_loss(x[:0], w, torch.zeros(0, dtype=torch.long), reduction="none")
    assert out.shape == (0,)


@pytest.mark.parametrize("margin", [COSFACE, ARCFACE, SPHEREFACE, COMBINED])
def test_gradcheck_float64(margin):
    x, w, labels = make_inputs(4, 5, 3, seed=9)
    labels[1] = -100
    x.requires_grad_(True)
    w.requires_grad_(True)

    def fn(x_, w_):
        return oclear_ext.margin_softmax_loss(x_, w_, labels, scale=4.0, margin=margin, reduction="none")

    assert torch.autograd.gradcheck(fn, (x, w), eps=1e-6, atol=1e-7)


def test_straight_through_gradient_treats_the_margin_as_identity():
    # With psi' := 1 the gradient equals that of a loss whose target logit is s*cos shifted by a constant.
    x, w, labels = make_inputs(8, 9, 4, seed=10)
    _, gx_st, gw_st = loss_and_grads(oclear_ext.margin_softmax_loss, x, w, labels, margin=ARCFACE, arcface_grad="straight_through")
    _, gx_ex, _ = loss_and_grads(oclear_ext.margin_softmax_loss, x, w, labels, margin=ARCFACE, arcface_grad="exact")
    _, rgx, rgw = loss_and_grads(reference.margin_softmax_loss, x, w, labels, margin=ARCFACE, arcface_grad="straight_through")
    torch.testing.assert_close(gx_st, rgx)
    torch.testing.assert_close(gw_st, rgw)
    assert not torch.allclose(gx_st, gx_ex)


def test_interclass_filter_removes_gradient_of_filtered_negatives():
    # One negative class is nearly identical to the embedding: above the threshold it gets no gradient.
    x = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.01, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0])
    _, _, gw = loss_and_grads(oclear_ext.margin_softmax_loss, x, w, labels, interclass_filter=0.5)
    assert (gw[1] == 0).all() and gw[0].abs().sum() > 0 and gw[2].abs().sum() > 0
    _, _, gw_nofilter = loss_and_grads(oclear_ext.margin_softmax_loss, x, w, labels)
    assert gw_nofilter[1].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("margin", [COSFACE, ARCFACE])
def test_low_precision_error_within_twice_plain_pytorch(dtype, margin):
    # The low-precision rule (docs/design.md#tests): error against the float64 reference <= 2 x plain PyTorch's own error + small atol.
    x64, w64, labels = make_inputs(96, 1500, 64, seed=11, ignore_fraction=0.05)
    want = loss_and_grads(reference.margin_softmax_loss, x64, w64, labels, margin=margin)
    plain = loss_and_grads(reference.margin_softmax_loss, x64.to(dtype), w64.to(dtype), labels, margin=margin)
    got = loss_and_grads(oclear_ext.margin_softmax_loss, x64.to(dtype), w64.to(dtype), labels, margin=margin)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    for name, g, p, ref in zip(("loss", "grad x", "grad w"), got, plain, want):
        atol = 1e-3 * ref.abs().max().item()
        assert _max_error(g, ref) <= 2 * _max_error(p, ref) + atol, name


def test_module_owns_weight_and_matches_functional():
    torch.manual_seed(0)
    module = oclear_ext.nn.MarginSoftmaxLoss(500, 32, margin=ARCFACE, scale=30.0)
    assert module.weight.shape == (500, 32)
    assert abs(module.weight.std().item() - 0.01) < 1e-3
    x = torch.randn(16, 32)
    labels = torch.randint(0, 500, (16,))
    expected = oclear_ext.margin_softmax_loss(x, module.weight, labels, margin=ARCFACE, scale=30.0)
    torch.testing.assert_close(module(x, labels), expected)
    module(x, labels).backward()
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    assert "num_classes=500" in repr(module)


def test_frozen_weight_gets_no_gradient_and_embeddings_still_do():
    x, w, labels = make_inputs(8, 12, 5, seed=12)
    x.requires_grad_(True)
    loss = oclear_ext.margin_softmax_loss(x, w, labels)
    loss.backward()
    _, rgx, _ = loss_and_grads(reference.margin_softmax_loss, x, w, labels)
    torch.testing.assert_close(x.grad, rgx)
    assert w.grad is None

"""The fused CUTLASS margin softmax (backend="cutlass_sm90") on a Hopper GPU: against the verified chunked
path and the float64 reference, bit-for-bit determinism, the true-max fallback, class shards, chunk
edges, and its errors. Skipped unless the GPU is compute capability 9.0 and the build has the sm_90a
kernels (oclear_ext.build_info["fused_sm90"]); the algorithm itself is checked on the CPU by
test_fused_margin_model.py. benchmarks/gpu_check.sh runs this file on the lent GPU.
"""

from __future__ import annotations

import pytest
import torch

import oclear_ext
from oclear_ext import reference

FUSED_READY = (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
               and bool(oclear_ext.build_info.get("fused_sm90")))
pytestmark = pytest.mark.skipif(not FUSED_READY, reason="needs an sm_90 GPU and a build with the sm_90a kernels")

MARGINS = {"cosface": (1.0, 0.0, 0.4), "arcface": (1.0, 0.5, 0.0), "combined": (1.2, 0.3, 0.15)}


def inputs(n, c, d, seed=0, ignore_every=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, d, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    x = w[labels] * 0.4 + torch.randn(n, d, generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return x.cuda().bfloat16(), w.cuda().bfloat16(), labels.cuda()


def loss_and_grads(x, w, labels, **kwargs):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = oclear_ext.margin_softmax_loss(x, w, labels, **kwargs)
    loss.backward()
    return loss.detach().double(), x.grad.double(), w.grad.double()


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("margin", sorted(MARGINS))
@pytest.mark.parametrize("n, c, d", [(1, 300, 64), (200, 1000, 128), (5, 7, 64), (1024, 70_000, 512)])
def test_matches_chunked_path_and_float64(margin, n, c, d):
    x, w, labels = inputs(n, c, d, ignore_every=13 if n > 1 else 0)
    kwargs = dict(scale=64.0, margin=MARGINS[margin])
    fused = loss_and_grads(x, w, labels, backend="cutlass_sm90", **kwargs)
    chunked = loss_and_grads(x, w, labels, backend="chunked", **kwargs)
    want = loss_and_grads(x.double(), w.double(), labels, **kwargs)
    # Both paths use the same bf16 x^ (its rounding dominates the error at n = 1): the loss agrees with the
    # chunked path's, and its error against float64 stays within twice the chunked one.
    assert abs(fused[0] - chunked[0]) <= 1e-4 * abs(chunked[0]) + 1e-5
    assert abs(fused[0] - want[0]) <= 2 * abs(chunked[0] - want[0]) + 1e-4 * abs(want[0]) + 1e-6
    for got, base, ref in zip(fused[1:], chunked[1:], want[1:]):
        # Both paths round B to bf16 before the gradient GEMMs: the fused error stays within twice the chunked one.
        assert rel(got, ref) <= 2 * rel(base, ref) + 1e-3


def test_interclass_filter_and_straight_through():
    x, w, labels = inputs(300, 2000, 256, seed=1)
    kwargs = dict(scale=32.0, margin=MARGINS["arcface"], interclass_filter=0.3, arcface_grad="straight_through")
    fused = loss_and_grads(x, w, labels, backend="cutlass_sm90", **kwargs)
    want = loss_and_grads(x.double(), w.double(), labels, **kwargs)
    assert abs(fused[0] - want[0]) <= 1e-4 * abs(want[0])
    assert rel(fused[1], want[1]) < 2e-2 and rel(fused[2], want[2]) < 2e-2


@pytest.mark.parametrize("class_chunk", [256, 300, 4096])
def test_chunk_edges_and_determinism(class_chunk):
    x, w, labels = inputs(333, 5000, 128, seed=2)
    with oclear_ext.margin_softmax_options(backend="cutlass_sm90", class_chunk=class_chunk):
        first = loss_and_grads(x, w, labels)
        second = loss_and_grads(x, w, labels)
    for a, b in zip(first, second):
        assert torch.equal(a, b), "two runs must give bit-identical loss and gradients"
    want = loss_and_grads(x.double(), w.double(), labels)
    assert rel(first[2], want[2]) < 2e-2


def underflow_inputs(seed, c=3000, d=64):
    """8 rows, no target in the shard: every cosine of rows 0-3 near -0.95, so at s = 64 their fixed-shift sum
    underflows (the forward's true-max rows) and their E' is all zeros."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=g)
    w = (-direction[None, :] + 0.2 * torch.randn(c, d, generator=g)).cuda().bfloat16()
    x = torch.cat([direction[None, :].expand(4, d), torch.randn(4, d, generator=g)]).cuda().bfloat16()
    return x, w, torch.full((8,), -100, device="cuda")


def test_underflowing_rows_take_the_true_max():
    c = 3000
    x, w, labels = underflow_inputs(8, c)
    forward = torch.ops.oclear.margin_softmax_forward
    lse, _, _ = forward(x, w, labels, 0, c, 64.0, 1.0, 0.0, 0.4, None, -100, False, 0, True, "cutlass_sm90")
    # The chunked path (a running max, the same bf16 x^) as the reference: against float64 on exactly normalised
    # rows, the bf16 x^ alone moves lse by up to ~0.03 at s = 64.
    want, _, _ = forward(x, w, labels, 0, c, 64.0, 1.0, 0.0, 0.4, None, -100, False, 0, True, "chunked")
    assert torch.isfinite(lse).all()
    assert torch.allclose(lse, want, rtol=1e-5, atol=1e-4)


def test_class_shards_match_the_chunked_op():
    x, w, labels = inputs(257, 3000, 128, seed=3)
    forward = torch.ops.oclear.margin_softmax_forward
    for start, stop in ((0, 1111), (1111, 3000)):
        args = (x, w[start:stop], labels, start, 3000, 64.0, 1.0, 0.5, 0.0, None, -100, False, 0, True)
        lse_f, target_f, _ = forward(*args, "cutlass_sm90")
        lse_c, target_c, _ = forward(*args, "chunked")
        assert torch.allclose(lse_f, lse_c, rtol=1e-4, atol=1e-4)
        assert torch.allclose(target_f, target_c, rtol=1e-4, atol=1e-3)


def test_unsupported_calls_say_why():
    x, w, labels = inputs(8, 100, 64)
    with pytest.raises(ValueError, match="bfloat16"):
        oclear_ext.margin_softmax_loss(x.half(), w.half(), labels, backend="cutlass_sm90")
    with pytest.raises(ValueError, match="multiple of 8"):
        oclear_ext.margin_softmax_loss(x[:, :60], w[:, :60], labels, backend="cutlass_sm90")
    with pytest.raises(ValueError, match="contiguous"):
        oclear_ext.margin_softmax_loss(x, w.t().contiguous().t(), labels, backend="cutlass_sm90")


def test_reference_agrees_on_a_plain_normalised_softmax():
    # margin (1, 0, 0): the margin-free softmax the peers compute (benchmarks compare on it).
    x, w, labels = inputs(512, 20_000, 256, seed=4)
    got = loss_and_grads(x, w, labels, scale=64.0, margin=(1.0, 0.0, 0.0), backend="cutlass_sm90")
    chunked = loss_and_grads(x, w, labels, scale=64.0, margin=(1.0, 0.0, 0.0), backend="chunked")
    want = reference.margin_softmax_loss(x.double(), w.double(), labels, scale=64.0, margin=(1.0, 0.0, 0.0))
    # A small loss (about 0.1): the bf16 x^ both paths use is most of the error against float64.
    assert abs(got[0] - chunked[0]) <= 1e-4 * abs(chunked[0]) + 1e-6
    assert abs(got[0] - want) <= 2 * abs(chunked[0] - want) + 1e-4 * abs(want)


@pytest.mark.parametrize("margin", ["cosface", "arcface"])
def test_store_mode_matches_recompute(margin):
    # 5003 classes: the store-E forward's GEMM takes 5000, a CUDA-core kernel the last 3 (as recompute mode's).
    x, w, labels = inputs(300, 5003, 128, seed=5, ignore_every=11)
    kwargs = dict(scale=64.0, margin=MARGINS[margin], backend="cutlass_sm90")
    stored = loss_and_grads(x, w, labels, backward="store", **kwargs)
    recomputed = loss_and_grads(x, w, labels, **kwargs)
    want = loss_and_grads(x.double(), w.double(), labels, scale=64.0, margin=MARGINS[margin])
    # The same merge; only the last class tile's partial is summed in another order (the store-E GEMM takes 5000
    # classes and the tail kernel adds the last 3 onto it), so the losses agree to float32 rounding.
    torch.testing.assert_close(stored[0], recomputed[0], rtol=1e-6, atol=0)
    for got, base, ref in zip(stored[1:], recomputed[1:], want[1:]):
        assert rel(got, ref) <= 2 * rel(base, ref) + 1e-3  # E' is rounded to bf16 once more


def test_store_mode_recomputes_the_rows_lost_to_the_flush():
    # Rows 0-3's E' is all zeros: the store-E backward must recompute their logits and agree with recompute mode.
    c = 3000
    x, w, labels = underflow_inputs(7, c)
    args = (0, c, 64.0, 1.0, 0.0, 0.4, None, -100, False, 0, True, "cutlass_sm90")
    lse, _, w_inv, stored = torch.ops.oclear.margin_softmax_forward_stored(x, w, labels, *args)
    assert torch.count_nonzero(stored[:4]) == 0
    gl = torch.full((8,), 0.125, device="cuda")
    got = torch.ops.oclear.margin_softmax_backward_stored(gl, -gl, x, w, labels, lse, w_inv, stored, *args, True, True)
    want = torch.ops.oclear.margin_softmax_backward(gl, -gl, x, w, labels, lse, w_inv, *args, True, True)
    assert rel(got[0][:4].double(), want[0][:4].double()) < 1e-2
    assert rel(got[0].double(), want[0].double()) < 1e-2 and rel(got[1].double(), want[1].double()) < 1e-2


def test_store_mode_budget_and_backend():
    x, w, labels = inputs(64, 1000, 64)
    with pytest.raises(ValueError, match="store_budget_bytes"):
        with oclear_ext.margin_softmax_options(store_budget_bytes=1000):
            oclear_ext.margin_softmax_loss(x, w, labels, backend="cutlass_sm90", backward="store")
    with pytest.raises(ValueError, match="needs backend='cutlass_sm90'"):
        oclear_ext.margin_softmax_loss(x, w, labels, backward="store")


def test_hardest_classes_fused_scoring_matches_chunked():
    x, w, labels = inputs(500, 30_000, 256, seed=6)
    exclude = torch.unique(labels)
    chunked = oclear_ext.hardest_classes(x, w, 64, exclude=exclude)
    with oclear_ext.margin_softmax_options(backend="cutlass_sm90"):
        fused = oclear_ext.hardest_classes(x, w, 64, exclude=exclude)
    torch.testing.assert_close(fused[0], chunked[0], rtol=1e-3, atol=1e-3)
    assert (fused[1] == chunked[1]).float().mean() > 0.9  # equal up to near-ties reordered by GEMM rounding
    assert not torch.isin(fused[1], exclude).any()

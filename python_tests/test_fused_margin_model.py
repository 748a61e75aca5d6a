"""The fused margin-softmax algorithm (backend "cutlass_sm90") checked on the CPU through its model
(fused_margin_model.py) against the float64 reference: loss, gradients, the true-max fallback, class
shards, chunking, ignored rows and the store-E variant. The GPU kernels implement this model; the GPU run
(benchmarks/gpu_check.sh) compares them with the chunked path."""

from __future__ import annotations

import pytest
import torch

import fused_margin_model as fm
from oclear_ext.reference.margin_softmax import margin_softmax_loss as reference_loss

SETTINGS = {
    "cosface": fm.Margin(64.0, (1.0, 0.0, 0.4)),
    "arcface": fm.Margin(64.0, (1.0, 0.5, 0.0)),
    "combined_filter": fm.Margin(32.0, (1.2, 0.3, 0.15), interclass_filter=0.35),
    "arcface_straight_through": fm.Margin(30.0, (1.0, 0.5, 0.0), straight_through=True),
}


def problem(n=300, classes=700, d=64, seed=0, ignore_every=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(classes, d, generator=g) * 2.0
    labels = torch.randint(0, classes, (n,), generator=g)
    x = w[labels] * 0.5 + torch.randn(n, d, generator=g)  # rows near their class: a spread of p_target
    if ignore_every:
        labels[::ignore_every] = -100
    return x, w, labels


def reference(x, w, labels, mg: fm.Margin, reduction="mean"):
    """float64 reference on the model's bf16 weight; gradients w.r.t. x and that weight."""
    xd = x.double().requires_grad_()
    wd = fm.bf16(w).double().requires_grad_()
    loss = reference_loss(xd, wd, labels, scale=mg.scale, margin=mg.m, interclass_filter=mg.interclass_filter,
                          arcface_grad="straight_through" if mg.straight_through else "exact", reduction=reduction)
    loss.sum().backward()
    return loss.detach(), xd.grad, wd.grad


def reference_mean_loss(x, w, labels, mg: fm.Margin) -> float:
    """float64 loss with the kernels' convention: cos = x^_bf16 . w^ (x^ rounded to bf16, not renormalised)."""
    x_hat = fm.normalise(x)[0].double()
    wb = fm.bf16(w).double()
    cos = (x_hat @ (wb / wb.norm(dim=1, keepdim=True)).T).clamp(-1, 1)
    z = fm.negative_logits(cos, mg)
    valid = labels != -100
    rows = torch.arange(len(labels))[valid]
    z_t = mg.scale * fm.target_cos(cos[rows, labels[valid]], *mg.m)
    z[rows, labels[valid]] = z_t
    return (torch.logsumexp(z[rows], dim=1) - z_t).mean().item()


def fused(x, w, labels, mg: fm.Margin, chunk=16384, store_e=False):
    lse, target, _, stored, _ = fm.forward(x, w, labels, mg, store_e=store_e)
    valid = labels != -100
    per_row = torch.where(valid, lse.double() - target.double(), torch.zeros(()))
    n_valid = valid.sum().clamp_min(1)
    grad = torch.where(valid, 1.0 / n_valid, 0.0).float()
    gx, gw = fm.backward(x, w, labels, lse, grad, -grad, mg, chunk=chunk, stored=stored)
    return per_row.sum() / n_valid, gx, gw


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", sorted(SETTINGS))
@pytest.mark.parametrize("store_e", [False, True])
def test_loss_and_gradients_match_float64(name, store_e):
    mg = SETTINGS[name]
    x, w, labels = problem(ignore_every=17)
    loss, gx, gw = fused(x, w, labels, mg, chunk=512, store_e=store_e)
    # The loss: float32 exp2 and tile sums, float64 merge and target terms.
    want = reference_mean_loss(x, w, labels, mg)
    assert abs(loss.item() - want) <= 2e-6 * abs(want)
    # Gradients against the float64 reference on exact x: B is rounded to bf16 before both gradient GEMMs
    # (and E' in store-E mode), and x^ is bf16 in the GEMMs.
    _, ref_gx, ref_gw = reference(x, w, labels, mg)
    assert rel(gx, ref_gx) < 2e-2
    assert rel(gw, ref_gw) < 2e-2
    # Ignored rows get no gradient.
    assert torch.all(gx[labels == -100] == 0)


def test_weight_gradient_is_orthogonal_to_the_weight_rows():
    # The projection runs on r_c summed from the stored bf16 B, so it removes dW's component along w_c as
    # exactly as projecting the GEMM's E itself would (fused_margin.h: projection_term).
    x, w, labels = problem(seed=3)
    _, _, gw = fused(x, w, labels, SETTINGS["arcface"])
    wb = fm.bf16(w).double()
    along = (gw.double() * wb).sum(1).abs() / (gw.double().norm(dim=1) * wb.norm(dim=1))
    assert along.max().item() < 1e-2  # bf16 rounding of dW itself (2^-9) sets this floor


def test_chunking_changes_nothing_but_the_dx_summation_order():
    x, w, labels = problem(classes=1000, seed=1)
    mg = SETTINGS["cosface"]
    lse = fm.forward(x, w, labels, mg)[0]
    grad = torch.full((x.shape[0],), 1.0 / x.shape[0])
    results = [fm.backward(x, w, labels, lse, grad, -grad, mg, chunk=c) for c in (256, 300, 768, 16384)]
    for gx, gw in results[1:]:
        assert torch.equal(gw, results[0][1])  # each class's gradient depends only on its own column
        assert rel(gx, results[0][0]) < 1e-6


def underflow_problem():
    """8 rows, 600 classes, no target in the shard (nothing rescues the sum), CosFace at s = 64: every cosine of
    rows 0-2 near -0.9, so exp(s cos - s) < 2^-126 for every class and their fixed-shift sum is 0."""
    d, classes = 32, 600
    g = torch.Generator().manual_seed(5)
    direction = torch.randn(d, generator=g)
    w = -direction[None, :] + 0.3 * torch.randn(classes, d, generator=g)
    x = torch.cat([direction[None, :].expand(3, d), torch.randn(5, d, generator=g)])
    return x, w, torch.full((8,), -100), fm.Margin(64.0, (1.0, 0.0, 0.4))


def test_rows_that_underflow_the_fixed_shift_take_the_true_max():
    x, w, labels, mg = underflow_problem()
    lse, _, _, _, true_max = fm.forward(x, w, labels, mg)
    assert true_max[:3].all() and not true_max[3:].any()
    xd, wd = fm.normalise(x)[0].double(), fm.bf16(w).double()
    cos = xd @ torch.nn.functional.normalize(wd, dim=1).T  # the kernels' convention (x^ in bf16 as is)
    want = torch.logsumexp(64.0 * cos, dim=1)
    assert torch.allclose(lse.double(), want, rtol=1e-5, atol=0)


def test_class_shards_combine_to_the_full_softmax():
    x, w, labels = problem(classes=900, seed=2)
    mg = SETTINGS["arcface"]
    full_lse, full_target, *_ = fm.forward(x, w, labels, mg)
    parts = [fm.forward(x, w[a:b], labels, mg, class_start=a) for a, b in ((0, 333), (333, 900))]
    lse = torch.logaddexp(parts[0][0].double(), parts[1][0].double())
    target = parts[0][1].double() + parts[1][1].double()
    assert torch.allclose(lse, full_lse.double(), rtol=1e-6, atol=0)
    assert torch.equal(target, full_target.double())  # each row's target comes from exactly one shard


def test_store_e_and_recompute_agree():
    x, w, labels = problem(seed=4)
    mg = SETTINGS["combined_filter"]
    _, gx_r, gw_r = fused(x, w, labels, mg, store_e=False)
    _, gx_s, gw_s = fused(x, w, labels, mg, store_e=True)
    # The two differ by E' = bf16(E w_inv) against recomputed float32 values: bf16 rounding apart.
    assert rel(gx_s, gx_r) < 1e-2
    assert rel(gw_s, gw_r) < 1e-2


def test_store_e_recomputes_the_rows_the_flush_lost():
    # The rows of the true-max test: every stored E' of the first three rows is flushed to 0, so their gradient
    # must come from recomputed logits (fused_margin.h's stored_row_lost), not from a * E' = 0.
    x, w, labels, mg = underflow_problem()
    lse, _, _, stored, true_max = fm.forward(x, w, labels, mg, store_e=True)
    assert true_max[:3].all() and torch.count_nonzero(stored[:3]) == 0
    grad = torch.full((8,), 1.0 / 8)
    gx_s, gw_s = fm.backward(x, w, labels, lse, grad, torch.zeros(8), mg, stored=stored)
    gx_r, gw_r = fm.backward(x, w, labels, lse, grad, torch.zeros(8), mg)
    xd, wd = x.double().requires_grad_(), fm.bf16(w).double().requires_grad_()
    cos = torch.nn.functional.normalize(xd, dim=1) @ torch.nn.functional.normalize(wd, dim=1).T
    (torch.logsumexp(64.0 * cos, dim=1).sum() / 8).backward()
    # The lost rows take the recompute path's very values; near-uniform rows cancel most of their x gradient, so
    # the kernels' bf16 x^ shows there at ~1.4 % (both modes alike).
    assert rel(gx_s[:3], gx_r[:3]) < 1e-6 and rel(gx_s[:3], xd.grad[:3]) < 3e-2
    assert rel(gx_s[3:], xd.grad[3:]) < 1e-2 and rel(gw_s, wd.grad) < 1e-2 and rel(gw_s, gw_r) < 1e-2

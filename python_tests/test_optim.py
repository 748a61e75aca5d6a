"""Row-sparse optimizers: dense equivalence, the lazy (exact on touch) state decay, sparse gradients, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oclear_ext import RandomNegatives, TopKNegatives
from oclear_ext.nn import MarginSoftmaxLoss
from oclear_ext.optim import RowSparseAdamW, RowSparseSGD

C, D = 30, 5
SGD_SETTINGS = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
ADAMW_SETTINGS = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)


def grads_for(steps: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(C, D, generator=g, dtype=torch.float64) for _ in range(steps)]


def sparse_rows(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.sparse_coo_tensor(rows.unsqueeze(0), grad[rows], grad.shape, check_invariants=True)


@pytest.mark.parametrize("ours, theirs, kw", [(RowSparseSGD, torch.optim.SGD, SGD_SETTINGS),
                                              (RowSparseAdamW, torch.optim.AdamW, ADAMW_SETTINGS)])
@pytest.mark.parametrize("as_sparse", [False, True])
def test_every_row_active_equals_the_dense_optimizer(ours, theirs, kw, as_sparse):
    w0 = torch.randn(C, D, dtype=torch.float64)
    bias0 = torch.randn(D, dtype=torch.float64)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    bias_a, bias_b = torch.nn.Parameter(bias0.clone()), torch.nn.Parameter(bias0.clone())
    # Two param groups (the class weights, and "the rest of the model" with another lr), dense or sparse grads.
    opt_a = ours([{"params": [a]}, {"params": [bias_a], "lr": kw["lr"] / 2}], **kw)
    opt_b = theirs([{"params": [b]}, {"params": [bias_b], "lr": kw["lr"] / 2}], **kw, foreach=False)
    for grad in grads_for(6):
        a.grad = sparse_rows(grad, torch.arange(C)) if as_sparse else grad.clone()
        b.grad = grad.clone()
        bias_a.grad = grad[0].clone()
        bias_b.grad = grad[0].clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bias_a, bias_b, rtol=1e-12, atol=1e-14)


def eager_reference(kind: str, w: torch.Tensor, grads, active_sets, kw) -> tuple[torch.Tensor, dict]:
    """The lazy contract evaluated eagerly: every step decays the state of every row; only active rows move."""
    w = w.clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for t, (grad, rows) in enumerate(zip(grads, active_sets), start=1):
        idle = torch.ones(C, dtype=torch.bool)
        idle[rows] = False
        if kind == "sgd":
            m[idle] *= kw["momentum"]
            g = grad[rows] + kw["weight_decay"] * w[rows]
            m[rows] = kw["momentum"] * m[rows] + g
            w[rows] -= kw["lr"] * m[rows]
        else:
            (b1, b2), lr = kw["betas"], kw["lr"]
            m[idle] *= b1
            v[idle] *= b2
            w[rows] *= 1 - lr * kw["weight_decay"]
            m[rows] = b1 * m[rows] + (1 - b1) * grad[rows]
            v[rows] = b2 * v[rows] + (1 - b2) * grad[rows] ** 2
            denom = (v[rows] / (1 - b2**t)).sqrt() + kw["eps"]
            w[rows] -= lr / (1 - b1**t) * m[rows] / denom
    return w, {"m": m, "v": v}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["sgd", "adamw"]), steps=st.integers(1, 8))
def test_lazy_decay_is_exact_on_touch(seed, kind, steps):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(C, D, generator=g, dtype=torch.float64)
    grads = grads_for(steps, seed)
    active_sets = [torch.sort(torch.randperm(C, generator=g)[: int(torch.randint(1, C, (1,), generator=g))]).values
                   for _ in range(steps)]
    kw = SGD_SETTINGS if kind == "sgd" else ADAMW_SETTINGS
    param = torch.nn.Parameter(w0.clone())
    opt = (RowSparseSGD if kind == "sgd" else RowSparseAdamW)([param], **kw)
    for grad, rows in zip(grads, active_sets):
        before = param.detach().clone()
        param.grad = sparse_rows(grad, rows)
        opt.step()
        idle = torch.ones(C, dtype=torch.bool)
        idle[rows] = False
        assert torch.equal(param.detach()[idle], before[idle])  # skipped rows are not touched at all
    want_w, want_state = eager_reference(kind, w0, grads, active_sets, kw)
    torch.testing.assert_close(param.detach(), want_w, rtol=1e-12, atol=1e-14)
    # The stored state of a row is exact as of its last touch: decay the eager reference back to it.
    state = opt.state[param]
    lag = (steps - state["last_step"]).double().unsqueeze(1)
    if kind == "sgd":
        torch.testing.assert_close(state["momentum_buffer"] * kw["momentum"] ** lag, want_state["m"], rtol=1e-12, atol=1e-14)
    else:
        b1, b2 = kw["betas"]
        torch.testing.assert_close(state["exp_avg"] * b1**lag, want_state["m"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state["exp_avg_sq"] * b2**lag, want_state["v"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("negatives", [TopKNegatives(8), RandomNegatives(rate=0.2, generator=torch.Generator().manual_seed(0))])
def test_sampled_loss_trains_with_row_sparse_steps(negatives):
    torch.manual_seed(0)
    head = MarginSoftmaxLoss(200, 16, scale=16.0, negatives=negatives, sparse_grad=True)
    encoder = torch.nn.Linear(32, 16)
    opt = RowSparseSGD([{"params": head.parameters()}, {"params": encoder.parameters()}], lr=0.5, momentum=0.9)
    x, labels = torch.randn(64, 32), torch.randint(0, 200, (64,))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        before = head.weight.detach().clone()
        loss = head(encoder(x), labels)
        loss.backward()
        opt.step()
        moved = (head.weight.detach() != before).any(1).nonzero().squeeze(1)
        assert torch.equal(moved, head.active_classes)  # exactly the sampled classes moved
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: RowSparseSGD(p, lr=-0.1), r"RowSparseSGD: lr must be a finite number >= 0, got -0.1"),
        (lambda p: RowSparseSGD(p, lr=0.1, momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
        (lambda p: RowSparseSGD(p, lr=0.1, weight_decay=float("nan")), "weight_decay must be a finite number"),
        (lambda p: RowSparseAdamW(p, betas=(0.9, 1.0)), r"betas must be two numbers in \[0, 1\)"),
        (lambda p: RowSparseAdamW(p, eps=-1.0), "eps must be a finite number >= 0"),
    ],
)
def test_bad_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make([torch.nn.Parameter(torch.zeros(3, 2))])


def test_gradient_that_is_not_row_sparse_is_rejected():
    param = torch.nn.Parameter(torch.zeros(4, 3))
    param.grad = torch.zeros(4, 3).to_sparse(2)
    with pytest.raises(ValueError, match="RowSparseSGD: sparse gradients must be row-sparse .* got sparse_dim=2"):
        RowSparseSGD([param], lr=0.1).step()

"""Label-aware contrastive loss (CLCE): plain reference, gradients, edge cases, bad input, world 2 == one process."""

from __future__ import annotations

import math

import pytest
import torch
from dist_harness import run_ranks

from oclear_ext import reference
from oclear_ext.losses import (LabelAwareContrastiveLoss, gathered_label_aware_contrastive_loss,
                               label_aware_contrastive_loss)


def problem(n: int = 14, dim: int = 6, classes: int = 4, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    return x, labels


def loss_and_grad(fn, x, labels, **kw):
    leaf = x.clone().requires_grad_(True)
    loss = fn(leaf, labels, **kw)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("detach_weights", [True, False])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_matches_the_plain_reference_value_and_gradient(beta, detach_weights, temperature):
    x, labels = problem(seed=int(beta * 10) + int(temperature * 100))
    labels[2] = -100  # ignored: neither anchor, positive nor negative
    valid = torch.ones_like(labels, dtype=torch.bool)
    valid[5] = False
    kw = dict(temperature=temperature, hard_negative_beta=beta, valid=valid, detach_weights=detach_weights)
    got, got_grad = loss_and_grad(label_aware_contrastive_loss, x, labels, **kw)
    want, want_grad = loss_and_grad(reference.label_aware_contrastive_loss, x, labels, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)
    assert got_grad[2].abs().max() == 0 and got_grad[5].abs().max() == 0  # rows that take no part get nothing


def test_hand_computed_value():
    # rows 0 and 1 coincide (class 0), row 2 is orthogonal (class 1): each class-0 anchor has s_p = 1 / tau and
    # one negative with s = 0; row 2 has no positive and is left out of the mean.
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    tau = 0.25
    got = label_aware_contrastive_loss(x, torch.tensor([0, 0, 1]), temperature=tau)
    assert got.item() == pytest.approx(math.log1p(math.exp(-1 / tau)), rel=1e-12)


@pytest.mark.parametrize("beta,detach_weights", [(0.0, True), (1.5, False)])
def test_gradcheck_float64(beta, detach_weights):
    # With detached weights the gradient is by design not the derivative of the value (beta > 0); it is checked
    # against the reference's above. Here: the exact derivative, with and without hard-negative weights.
    x, labels = problem(n=8, dim=4, classes=3, seed=3)
    labels[0] = -100
    fn = lambda t: label_aware_contrastive_loss(t, labels, temperature=0.3, hard_negative_beta=beta,  # noqa: E731
                                                detach_weights=detach_weights)
    assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(True),), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(fn, (x.clone().requires_grad_(True),), eps=1e-6, atol=1e-6)


def test_beta_zero_is_supcon_with_uniform_negatives_and_weights_average_one():
    x, labels = problem(seed=5)
    plain = label_aware_contrastive_loss(x, labels, temperature=0.2)
    # The weights have mean 1 over each anchor's negatives, and exp(beta s) rises with exp(s): by Chebyshev's
    # sum inequality the weighted negative sum is >= the uniform one, so the loss can only grow with beta.
    previous = plain
    for beta in (0.5, 1.0, 4.0):
        weighted = label_aware_contrastive_loss(x, labels, temperature=0.2, hard_negative_beta=beta)
        assert weighted > previous
        previous = weighted
    # Equally similar negatives all weigh 1: beta changes nothing.
    e = torch.eye(4, dtype=torch.float64)
    x = torch.stack([e[0], e[0], e[1], e[2], e[3]])
    labels = torch.tensor([0, 0, 1, 2, 3])
    torch.testing.assert_close(label_aware_contrastive_loss(x, labels, hard_negative_beta=3.0),
                               label_aware_contrastive_loss(x, labels), rtol=1e-14, atol=0)


@pytest.mark.parametrize("case", ["all positives", "single sample", "no positives", "all ignored", "empty"])
def test_no_valid_term_gives_zero_with_zero_gradient(case):
    x, _ = problem(n=6)
    labels = {"all positives": torch.zeros(6, dtype=torch.long), "single sample": torch.tensor([3]),
              "no positives": torch.arange(6), "all ignored": torch.full((6,), -100),
              "empty": torch.zeros(0, dtype=torch.long)}[case]
    x = x[: len(labels)]
    for beta in (0.0, 1.0):
        loss, grad = loss_and_grad(label_aware_contrastive_loss, x, labels, hard_negative_beta=beta)
        # all positives: every anchor has positives but no negative, log(e^s / e^s) = 0 for each term
        assert loss.item() == 0.0 and not loss.isnan()
        assert torch.isfinite(grad).all() and grad.abs().sum().item() == 0.0


def test_bfloat16_inputs_accumulate_in_float32():
    x, labels = problem(n=64, dim=32, classes=8, seed=7, dtype=torch.float32)
    xb = x.bfloat16().requires_grad_(True)
    loss = label_aware_contrastive_loss(xb, labels, temperature=0.05, hard_negative_beta=1.0)
    assert loss.dtype == torch.float32
    want = reference.label_aware_contrastive_loss(xb.detach().double(), labels, temperature=0.05,
                                                  hard_negative_beta=1.0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()


def test_module_equals_the_function():
    x, labels = problem(seed=9)
    module = LabelAwareContrastiveLoss(temperature=0.3, hard_negative_beta=1.0)
    torch.testing.assert_close(module(x, labels), label_aware_contrastive_loss(x, labels, 0.3, 1.0))
    assert "hard_negative_beta=1.0" in repr(module)
    # no process group: the gathered form is the one-process loss
    torch.testing.assert_close(gathered_label_aware_contrastive_loss(x, labels, 0.3, 1.0),
                               label_aware_contrastive_loss(x, labels, 0.3, 1.0))


@pytest.mark.parametrize("call,match", [
    (lambda x, y: label_aware_contrastive_loss(x[0], y), "2-D"),
    (lambda x, y: label_aware_contrastive_loss(x.long(), y), "floating point"),
    (lambda x, y: label_aware_contrastive_loss(x, y[:-1]), "labels must be a"),
    (lambda x, y: label_aware_contrastive_loss(x, y.double()), "integer"),
    (lambda x, y: label_aware_contrastive_loss(x, y, temperature=0.0), "temperature"),
    (lambda x, y: label_aware_contrastive_loss(x, y, temperature=float("nan")), "temperature"),
    (lambda x, y: label_aware_contrastive_loss(x, y, hard_negative_beta=-1.0), "hard_negative_beta"),
    (lambda x, y: label_aware_contrastive_loss(x, y, valid=torch.ones(3, dtype=torch.bool)), "valid"),
    (lambda x, y: label_aware_contrastive_loss(x, y, valid=torch.ones_like(y)), "valid"),
    (lambda x, y: LabelAwareContrastiveLoss(temperature=-1.0), "temperature"),
])
def test_bad_input_is_a_value_error_naming_it(call, match):
    x, labels = problem()
    with pytest.raises(ValueError, match=match):
        call(x, labels)


# --- world 2: every rank holds half of the global batch -----------------------------------------------------------

def global_batch(seed: int):
    x, labels = problem(n=16, dim=5, classes=5, seed=seed)
    labels[3] = -100
    valid = torch.ones_like(labels, dtype=torch.bool)
    valid[12] = False
    return x, labels, valid


def _gathered_worker(rank, world_size, settings):
    out = []
    for seed, kw in settings:
        x, labels, valid = global_batch(seed)
        n = x.shape[0] // world_size
        own = slice(rank * n, (rank + 1) * n)
        local = x[own].clone().requires_grad_(True)
        loss = gathered_label_aware_contrastive_loss(local, labels[own], valid=valid[own], **kw)
        loss.backward()
        out.append((loss.detach(), local.grad))
    return out


SETTINGS = [(0, dict(temperature=0.1)), (1, dict(temperature=0.3, hard_negative_beta=1.0)),
            (2, dict(temperature=0.2, hard_negative_beta=2.0, detach_weights=False))]


def test_two_ranks_equal_one_process_on_the_global_batch():
    ranks = run_ranks(_gathered_worker, 2, SETTINGS)
    for i, (seed, kw) in enumerate(SETTINGS):
        x, labels, valid = global_batch(seed)
        want, want_grad = loss_and_grad(label_aware_contrastive_loss, x, labels, valid=valid, **kw)
        n = x.shape[0] // 2
        for rank, results in enumerate(ranks):
            loss, grad = results[i]
            torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)  # the same global value everywhere
            # each rank's gradient of its own rows is the one-process gradient (not world times it): the
            # convention under which DDP's summed model gradients are the one-process gradient
            torch.testing.assert_close(grad, want_grad[rank * n : (rank + 1) * n], rtol=1e-10, atol=1e-12)

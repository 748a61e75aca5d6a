"""Negative-class sampling: active-set semantics, determinism, loss over the active set, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import oclear_ext
from oclear_ext import RandomNegatives, TopKNegatives, reference
from oclear_ext.nn import MarginSoftmaxLoss


def problem(n=12, c=200, d=8, seed=0, ignored=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[:ignored] = -100
    return x, w, labels


def active_of(negatives, x, w, labels, **kw):
    return oclear_ext.margin_softmax_loss(x, w, labels, negatives=negatives, return_active=True, **kw)[1]


@given(
    c=st.integers(20, 300),
    n=st.integers(1, 30),
    choice=st.sampled_from(["rate", "count", "topk"]),
    amount=st.floats(0.01, 1.0),
    seed=st.integers(0, 1000),
)
def test_active_set_holds_positives_once_and_the_right_count(c, n, choice, amount, seed):
    x, w, labels = problem(n, c, 4, seed, ignored=min(2, n - 1))
    positives = torch.unique(labels[labels != -100])
    p = positives.numel()
    if choice == "rate":
        negatives, expected = RandomNegatives(rate=amount), max(p, math.ceil(amount * c))
    elif choice == "count":
        count = int(amount * c)
        negatives, expected = RandomNegatives(count=count), p + min(count, c - p)
    else:
        k, extra = int(amount * c), int(amount * 10)
        negatives = TopKNegatives(k, random=extra)
        expected = p + min(k, c - p) + min(extra, c - p - min(k, c - p))
    active = active_of(negatives, x, w, labels)
    assert active.numel() == max(expected, 1)
    assert torch.equal(active, torch.unique(active))  # sorted, no duplicates
    assert torch.isin(positives, active).all()


def test_random_negatives_are_reproducible_with_a_generator():
    x, w, labels = problem()
    draws = [active_of(RandomNegatives(rate=0.1, generator=torch.Generator().manual_seed(5)), x, w, labels) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    other = active_of(RandomNegatives(rate=0.1, generator=torch.Generator().manual_seed(6)), x, w, labels)
    assert not torch.equal(draws[0], other)


def test_topk_negatives_are_the_hardest_non_positive_classes():
    x, w, labels = problem(c=500)
    valid = labels != -100
    positives = torch.unique(labels[valid])
    active = active_of(TopKNegatives(40), x, w, labels)
    _, hardest = reference.hardest_classes(x[valid], w, 40, exclude=positives)
    assert torch.equal(active, torch.sort(torch.cat([positives, hardest])).values)
    assert torch.equal(active, active_of(TopKNegatives(40), x, w, labels))  # deterministic without a generator


@pytest.mark.parametrize("k", [200, 195, 190])  # the batch has at most 10 positives: k >= C - 10 takes all
def test_topk_with_k_up_to_c_is_the_full_loss(k):
    x, w, labels = problem(c=200)
    for margin in [(1.0, 0.0, 0.4), (1.0, 0.5, 0.0)]:
        full = oclear_ext.margin_softmax_loss(x, w, labels, margin=margin)
        torch.testing.assert_close(oclear_ext.margin_softmax_loss(x, w, labels, margin=margin, negatives=TopKNegatives(k)), full)


def test_loss_and_gradient_are_those_of_the_active_classes():
    x, w, labels = problem()
    x.requires_grad_(True)
    w.requires_grad_(True)
    loss, active = oclear_ext.margin_softmax_loss(x, w, labels, negatives=RandomNegatives(rate=0.2), return_active=True)
    loss.backward()
    # The same loss by hand: the reference over weight[active] with labels renumbered.
    valid = labels != -100
    local = torch.where(valid, torch.searchsorted(active, labels.clamp_min(0)), labels)
    want = reference.margin_softmax_loss(x.detach(), w.detach()[active], local)
    torch.testing.assert_close(loss.detach(), want)
    touched = w.grad.abs().sum(1) != 0
    assert torch.equal(touched.nonzero().squeeze(1), active)


def test_module_keeps_active_classes_and_gives_row_sparse_gradients():
    x, w, labels = problem()
    module = MarginSoftmaxLoss(200, 8, dtype=torch.float64, negatives=TopKNegatives(16), sparse_grad=True)
    module.weight.data.copy_(w)
    module(x, labels).backward()
    grad = module.weight.grad.coalesce()
    assert grad.is_sparse and torch.equal(grad.indices()[0], module.active_classes)
    dense = MarginSoftmaxLoss(200, 8, dtype=torch.float64, negatives=TopKNegatives(16))
    dense.weight.data.copy_(w)
    dense(x, labels).backward()
    torch.testing.assert_close(grad.to_dense(), dense.weight.grad)


def test_all_ignored_batch_without_negatives_has_zero_loss():
    x, w, labels = problem(n=4, ignored=4)
    loss, active = oclear_ext.margin_softmax_loss(x, w, labels, negatives=RandomNegatives(count=0), return_active=True)
    assert loss.item() == 0.0 and active.tolist() == [0]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: RandomNegatives(), "exactly one of rate, count and size"),
        (lambda: RandomNegatives(rate=0.1, count=5), "exactly one of rate, count and size"),
        (lambda: RandomNegatives(rate=0.0), r"rate must be in \(0, 1\], got 0.0"),
        (lambda: RandomNegatives(rate=1.5), r"rate must be in \(0, 1\]"),
        (lambda: RandomNegatives(count=-1), "count must be an int >= 0"),
        (lambda: TopKNegatives(-1), "k must be an int >= 0, got -1"),
        (lambda: TopKNegatives(5, random=-2), "random must be an int >= 0"),
    ],
)
def test_bad_sampler_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_k_above_the_number_of_classes_is_rejected():
    x, w, labels = problem(c=50)
    with pytest.raises(ValueError, match="k = 51 exceeds the number of classes, 50"):
        oclear_ext.margin_softmax_loss(x, w, labels, negatives=TopKNegatives(51))


def test_unknown_sampler_is_rejected():
    x, w, labels = problem()
    with pytest.raises(TypeError, match="negatives must be None, RandomNegatives or TopKNegatives"):
        oclear_ext.margin_softmax_loss(x, w, labels, negatives=0.1)


def test_a_class_id_as_ignore_index_never_collides_with_active_positions():
    # ignore_index = 3 is a class id; after renumbering, position 3 of the active set is a real class.
    x, w, labels = problem(c=40)
    labels[:2] = 3
    labels[2:] = labels[2:].clamp_min(4)
    full = oclear_ext.margin_softmax_loss(x, w, labels, ignore_index=3)
    sampled = oclear_ext.margin_softmax_loss(x, w, labels, ignore_index=3, negatives=TopKNegatives(40))
    torch.testing.assert_close(sampled, full)

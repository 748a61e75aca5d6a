"""RandomNegatives(size=K): a fixed-size active set chosen without reading anything back to the host."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import oclear_ext
from oclear_ext import RandomNegatives

# Ops whose result needs a device value on the host (on CUDA, a stream synchronisation): a data-dependent
# output size or a scalar read.
HOST_READS = {"aten::nonzero", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::_unique",
              "aten::masked_select", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::item"}


class HostReads(TorchDispatchMode):
    """Records the host-reading ops a computation dispatches (also boolean-mask indexing, which is one)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        bool_index = name == "aten::index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
        if name in HOST_READS or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def problem(n, c, d=6, seed=0, ignored=2):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(c, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[:ignored] = -100
    return x, w, labels


def loss_and_active(negatives, x, w, labels):
    return oclear_ext.margin_softmax_loss(x, w, labels, scale=16.0, margin=(1.0, 0.2, 0.0), negatives=negatives,
                                          return_active=True, check_labels=False)


@settings(deadline=None)
@given(n=st.integers(1, 40), c=st.integers(1, 300), extra=st.integers(0, 50), seed=st.integers(0, 1000))
def test_the_active_set_has_the_fixed_size_and_every_positive(n, c, extra, seed):
    x, w, labels = problem(n, c, seed=seed, ignored=min(2, n - 1))
    size = min(n, c) + extra
    _, active = loss_and_active(RandomNegatives(size=size), x, w, labels)
    assert active.numel() == min(size, c)
    assert torch.equal(active, torch.unique(active))  # sorted, no duplicates
    assert torch.isin(labels[labels != -100], active).all()


def test_the_loss_is_the_margin_softmax_over_the_active_set():
    x, w, labels = problem(24, 500, seed=3)
    x.requires_grad_(), w.requires_grad_()
    loss, active = loss_and_active(RandomNegatives(size=60, generator=torch.Generator().manual_seed(1)), x, w, labels)
    loss.backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    local = torch.where(labels >= 0, torch.searchsorted(active, labels.clamp_min(0)), labels)
    expected = oclear_ext.margin_softmax_loss(x2, w2[active], local, scale=16.0, margin=(1.0, 0.2, 0.0))
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-12, atol=1e-12)


def test_draws_are_reproducible_and_the_negatives_uniform():
    x, w, labels = problem(8, 40, seed=5, ignored=0)
    draw = lambda seed: loss_and_active(RandomNegatives(size=20, generator=torch.Generator().manual_seed(seed)),
                                        x, w, labels)[1]
    assert torch.equal(draw(7), draw(7)) and not torch.equal(draw(7), draw(8))
    positives = torch.unique(labels)
    counts = torch.zeros(40)
    trials = 2000
    gen = torch.Generator().manual_seed(0)
    for _ in range(trials):
        counts[loss_and_active(RandomNegatives(size=20, generator=gen), x, w, labels)[1]] += 1
    others = torch.ones(40, dtype=torch.bool)
    others[positives] = False
    assert (counts[positives] == trials).all()
    expected = trials * (20 - positives.numel()) / int(others.sum())
    # Binomial sd at these numbers is about 22 draws; 6 sd bounds a uniform sampler's spread, a biased one leaves them.
    assert (counts[others] - expected).abs().max() < 6 * (expected * (1 - expected / trials)) ** 0.5


def test_the_fixed_size_path_reads_nothing_back_but_the_counting_samplers_do():
    x, w, labels = problem(32, 1000, seed=2)
    w.requires_grad_()
    with HostReads() as fixed:
        loss, _ = loss_and_active(RandomNegatives(size=64), x, w, labels)
        loss.backward()
    assert fixed.seen == []
    with HostReads() as counted:  # the detector sees the data-dependent sizes of the other form
        loss_and_active(RandomNegatives(rate=0.05), x, w, labels)
    assert counted.seen


def test_fullgraph_compile_of_the_fixed_size_loss():
    torch._dynamo.reset()
    x, w, labels = problem(16, 300, d=8, seed=4)
    x, w = x.float(), w.float()
    fn = lambda x, w, labels: loss_and_active(RandomNegatives(size=32), x, w, labels)
    loss, active = torch.compile(fn, fullgraph=True)(x, w, labels)
    assert active.numel() == 32 and torch.isin(labels[labels != -100], active).all()
    local = torch.where(labels >= 0, torch.searchsorted(active, labels.clamp_min(0)), labels)
    expected = oclear_ext.margin_softmax_loss(x, w[active], local, scale=16.0, margin=(1.0, 0.2, 0.0))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, match", [(dict(size=0), "size must be an int >= 1"),
                                        (dict(size=4, rate=0.5), "exactly one of rate, count and size")])
def test_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        RandomNegatives(**bad)


def test_a_size_smaller_than_the_batch_is_refused():
    x, w, labels = problem(20, 100)
    with pytest.raises(ValueError, match=r"size = 8 cannot hold the positives of 20 rows.*>= 20"):
        loss_and_active(RandomNegatives(size=8), x, w, labels)
    _, active = loss_and_active(RandomNegatives(size=8), *problem(20, 5))
    assert active.numel() == 5  # fewer classes than rows: size >= C takes them all


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_a_generator_on_another_device_is_refused():
    x, w, labels = (t.cuda() for t in problem(8, 50))
    with pytest.raises(ValueError, match="the generator is on cpu"):
        loss_and_active(RandomNegatives(size=16, generator=torch.Generator()), x, w, labels)

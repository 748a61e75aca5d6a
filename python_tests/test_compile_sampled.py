"""torch.compile of the sampled margin softmax: the active-set selection is one deliberate graph break,
the rest (row gather, loss, backward) compiles, and results equal eager."""

from __future__ import annotations

import pytest
import torch
from margin_cases import loss_and_grads, make_inputs

import oclear_ext
from oclear_ext import RandomNegatives, TopKNegatives


def sampled(negatives_factory):
    def loss(x, w, labels):
        return oclear_ext.margin_softmax_loss(x, w, labels, scale=16.0, margin=(1.0, 0.3, 0.0),
                                              negatives=negatives_factory())
    return loss


FACTORIES = {
    "topk": lambda: TopKNegatives(6),
    "random": lambda: RandomNegatives(rate=0.2, generator=torch.Generator().manual_seed(7)),  # same draw each call
}


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_compiled_sampled_loss_equals_eager(kind):
    torch._dynamo.reset()
    x, w, labels = make_inputs(24, 90, 8, dtype=torch.float32, seed=3, ignore_fraction=0.2)
    fn = sampled(FACTORIES[kind])
    eager = loss_and_grads(fn, x, w, labels)
    compiled = loss_and_grads(torch.compile(fn), x, w, labels)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fullgraph_names_the_deliberate_graph_break():
    torch._dynamo.reset()
    x, w, labels = make_inputs(24, 90, 8, dtype=torch.float32, seed=3)
    with pytest.raises(Exception, match="active_classes"):
        torch.compile(sampled(FACTORIES["topk"]), fullgraph=True)(x, w, labels)

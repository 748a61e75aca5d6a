"""Op conventions (docs/design.md#op-conventions): opcheck of the private ops, torch.compile of the public loss."""

from __future__ import annotations

import pytest
import torch
from margin_cases import ARCFACE, COMBINED, check_compile_matches_eager, make_inputs

import oclear_ext
from oclear_ext._ops.margin_softmax import MarginSettings

FORWARD = torch.ops.oclear.margin_softmax_forward.default
BACKWARD = torch.ops.oclear.margin_softmax_backward.default


def forward_args(dtype, margin=COMBINED, filt=None, requires_grad=True, class_start=0, num_classes=None):
    x, w, labels = make_inputs(6, 11, 5, dtype=dtype, seed=3, ignore_fraction=0.2)
    num_classes = num_classes or class_start + w.shape[0]
    labels = labels + class_start * (labels >= 0)
    settings = MarginSettings(16.0, margin, "exact", filt, -100)
    return (x.requires_grad_(requires_grad), w.requires_grad_(requires_grad), labels, class_start, num_classes, *settings.op_args())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("filt", [None, 0.3])
def test_opcheck_forward(dtype, filt):
    torch.library.opcheck(FORWARD, forward_args(dtype, filt=filt))


def test_opcheck_forward_on_a_class_block():
    # A block of classes [5, 16) of 40, as a class-sharded classifier calls it: labels outside the
    # block carry no target there.
    args = list(forward_args(torch.float64, class_start=5, num_classes=40))
    args[2] = torch.tensor([5, 15, 0, 39, -100, 7])
    torch.library.opcheck(FORWARD, tuple(args))
    lse, target, _ = FORWARD(*args)
    assert target[2] == 0 and target[3] == 0 and target[4] == 0 and target[0] != 0


def test_opcheck_backward():
    fargs = forward_args(torch.float64, requires_grad=False)
    x, w, labels, *settings = fargs
    lse, _, w_inv = FORWARD(*fargs)
    g = torch.rand(6, dtype=torch.float64)
    for need_x, need_w in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(BACKWARD, (g, -g, x, w, labels, lse, w_inv, *settings, need_x, need_w))


def test_blocks_compose_into_the_full_loss():
    # lse over all classes = logsumexp of the blocks' lse; target = sum of the blocks' targets.
    x, w, labels = make_inputs(9, 23, 4, seed=4)
    s = MarginSettings(30.0, ARCFACE).op_args()
    blocks = [(0, 7), (7, 8), (8, 23)]
    parts = [FORWARD(x, w[a:b], labels, a, 23, *s) for a, b in blocks]
    lse = torch.logsumexp(torch.stack([p[0] for p in parts]), 0)
    target = sum(p[1] for p in parts)
    full = oclear_ext.margin_softmax_loss(x, w, labels, scale=30.0, margin=ARCFACE, reduction="none")
    torch.testing.assert_close(lse - target, full)


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    check_compile_matches_eager("cpu")

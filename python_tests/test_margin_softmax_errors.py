"""Every bad input to the margin softmax raises an error that names what was wrong."""

from __future__ import annotations

import math

import pytest
import torch

import oclear_ext
from oclear_ext.nn import MarginSoftmaxLoss


def good():
    return torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 3, 9, -100])


def call(x=None, w=None, labels=None, **kwargs):
    gx, gw, gl = good()
    return oclear_ext.margin_softmax_loss(gx if x is None else x, gw if w is None else w, gl if labels is None else labels, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=torch.randint(0, 5, (4, 8))), TypeError, r"embeddings must be float32, float64, bfloat16 or float16, got Long"),
        (dict(w=torch.randn(10, 8, dtype=torch.float64)), TypeError, r"weight must have the embeddings. dtype, or be float32 beside 16-bit embeddings, got weight Double"),
        (dict(x=torch.randn(8)), ValueError, r"embeddings must be a 2-D tensor, got shape \[8\]"),
        (dict(x=torch.randn(4, 2, 8)), ValueError, r"embeddings must be a 2-D tensor"),
        (dict(w=torch.randn(10, 7)), ValueError, r"weight must have shape \(num_classes, D\) with the embeddings' D = 8, got weight shape \[10, 7\]"),
        (dict(w=torch.randn(0, 8)), ValueError, r"weight holds no classes"),
        (dict(x=torch.randn(4, 0), w=torch.randn(10, 0)), ValueError, r"embedding dimension must be >= 1"),
        (dict(labels=torch.tensor([0, 3, 9, 1], dtype=torch.int32)), TypeError, r"labels must be int64, got Int"),
        (dict(labels=torch.tensor([0, 3, 9])), ValueError, r"labels must have shape \(N,\) = \(4,\)"),
        (dict(labels=torch.tensor([0, 3, 10, 1])), IndexError, r"labels\[2\] = 10 is out of range: expected a class id in \[0, 10\) or ignore_index = -100"),
        (dict(labels=torch.tensor([0, -1, 1, 1])), IndexError, r"labels\[1\] = -1 is out of range"),
        (dict(scale=-1.0), ValueError, r"scale must be a finite number > 0, got -1"),
        (dict(scale=0.0), ValueError, r"scale must be a finite number > 0"),
        (dict(scale=math.inf), ValueError, r"scale must be a finite number > 0, got inf"),
        (dict(scale=math.nan), ValueError, r"scale must be a finite number > 0, got nan"),
        (dict(scale="64"), TypeError, r"scale must be a real number"),
        (dict(margin=(0.5, 0.0, 0.0)), ValueError, r"margin m1 .* must be finite and >= 1, got 0.5"),
        (dict(margin=(1.0, -0.1, 0.0)), ValueError, r"margin m2 .* must be in \[0, pi\), got -0.1"),
        (dict(margin=(1.0, 3.2, 0.0)), ValueError, r"margin m2 .* must be in \[0, pi\)"),
        (dict(margin=(1.0, 0.0, -0.2)), ValueError, r"margin m3 .* must be finite and >= 0, got -0.2"),
        (dict(margin=(1.0, 0.0, math.nan)), ValueError, r"margin m3"),
        (dict(margin=(1.0, 0.5)), ValueError, r"margin must be a tuple of three numbers"),
        (dict(margin=0.5), ValueError, r"margin must be a tuple of three numbers"),
        (dict(interclass_filter=1.5), ValueError, r"interclass_filter must be a cosine threshold in \[-1, 1\] or None, got 1.5"),
        (dict(interclass_filter="high"), TypeError, r"interclass_filter must be a number or None"),
        (dict(reduction="avg"), ValueError, r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
        (dict(arcface_grad="approx"), ValueError, r"arcface_grad must be one of \('exact', 'straight_through'\), got 'approx'"),
        (dict(ignore_index=1.5), TypeError, r"ignore_index must be an int"),
        (dict(backend="cutlass"), ValueError, r"backend must be one of 'auto', 'chunked', 'cutlass_sm90', got 'cutlass'"),
        (dict(backend="cutlass_sm90"), ValueError,
         r"backend='cutlass_sm90' selects CUDA kernels \(compute capability 9.0\), but the embeddings are on cpu"),
    ],
)
def test_bad_input_raises_named_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        call(**kwargs)


def test_every_error_names_the_op():
    with pytest.raises(ValueError, match=r"^oclear_ext.margin_softmax_loss: "):
        call(scale=-1.0)
    with pytest.raises(IndexError, match=r"^oclear_ext.margin_softmax_loss: "):
        call(labels=torch.tensor([0, 0, 0, 99]))


def test_device_mix_is_rejected():
    # Without a GPU, a meta-device weight stands in for "another device".
    x, _, labels = good()
    with pytest.raises((ValueError, RuntimeError), match=r"one device"):
        oclear_ext.margin_softmax_loss(x, torch.randn(10, 8, device="meta"), labels)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=0, embedding_dim=8), r"num_classes must be a positive int, got 0"),
        (dict(num_classes=10, embedding_dim=-1), r"embedding_dim must be a positive int, got -1"),
        (dict(num_classes=10, embedding_dim=8, reduction="max"), r"reduction must be one of"),
        (dict(num_classes=10, embedding_dim=8, margin=(1.0, 4.0, 0.0)), None),
    ],
)
def test_module_rejects_bad_settings(kwargs, match):
    if match is None:  # ranges of m1..m3 are checked when the op runs, for every backend alike
        module = MarginSoftmaxLoss(**kwargs)
        with pytest.raises(ValueError, match=r"margin m2"):
            module(torch.randn(2, 8), torch.tensor([0, 1]))
        return
    with pytest.raises(ValueError, match=match):
        MarginSoftmaxLoss(**kwargs)


def test_backend_option_block():
    x, w, labels = good()
    with oclear_ext.margin_softmax_options(backend="chunked"):
        chunked = oclear_ext.margin_softmax_loss(x, w, labels)
    assert torch.equal(chunked, oclear_ext.margin_softmax_loss(x, w, labels))  # the CPU kernels either way
    with pytest.raises(ValueError, match=r"margin_softmax_options: backend must be one of"):
        with oclear_ext.margin_softmax_options(backend="fast"):
            pass
    # The block's backend reaches the op: on the CPU the CUDA-only one is refused.
    with oclear_ext.margin_softmax_options(backend="cutlass_sm90"):
        with pytest.raises(ValueError, match=r"selects CUDA kernels"):
            oclear_ext.margin_softmax_loss(x, w, labels)


def test_store_mode_errors():
    x, w, labels = good()
    with pytest.raises(ValueError, match=r"backward must be one of 'recompute', 'store', got 'keep'"):
        oclear_ext.margin_softmax_loss(x, w, labels, backward="keep")
    # The store-E backward exists only in the fused CUDA kernels; on the CPU it says so.
    with pytest.raises(ValueError, match=r"backward='store' needs backend='cutlass_sm90' on a CUDA device, got "
                                         r"backend='auto' on cpu"):
        oclear_ext.margin_softmax_loss(x, w, labels, backward="store")
    # Over the budget: refused from the shapes, before anything runs (4 x 10 x 2 bytes = 80 > 64).
    with oclear_ext.margin_softmax_options(backward="store", store_budget_bytes=64):
        with pytest.raises(ValueError, match=r"backward='store' would keep 0 MiB of bf16 values \(N = 4 x C = 10\), "
                                             r"above store_budget_bytes"):
            oclear_ext.margin_softmax_loss(x, w, labels)
    with pytest.raises(ValueError, match=r"store_budget_bytes must be an int >= 0, got -1"):
        with oclear_ext.margin_softmax_options(store_budget_bytes=-1):
            pass


def test_store_mode_is_refused_by_the_sharded_head():
    from oclear_ext._ops.margin_softmax import MarginSettings
    from oclear_ext.distributed.sharded_softmax import sharded_margin_softmax_loss

    x, w, labels = good()
    with pytest.raises(ValueError, match=r"class-sharded margin softmax does not take backward='store'"):
        sharded_margin_softmax_loss(x, labels, w, range(0, 10), 10, MarginSettings(backward="store"))

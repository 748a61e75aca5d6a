"""Hardest-class scoring op against the materialised reference (torch.sort of the scores)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import oclear_ext
from oclear_ext import reference


@given(
    n=st.integers(1, 20),
    c=st.integers(1, 400),
    d=st.integers(2, 16),  # D = 1 makes every score +-1: ties whose order depends on rounding
    k_fraction=st.floats(0.0, 1.0),
    exclude_count=st.integers(0, 30),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_float64(n, c, d, k_fraction, exclude_count, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    exclude = torch.randint(0, c, (min(exclude_count, c),), generator=g)  # duplicates on purpose
    k = int(k_fraction * (c - torch.unique(exclude).numel()))
    got = oclear_ext.hardest_classes(x, w, k, exclude=exclude)
    want = reference.hardest_classes(x, w, k, exclude=torch.unique(exclude))
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    assert not set(got[1].tolist()) & set(exclude.tolist())


@pytest.mark.parametrize("c", [1000, 5000, 9000])  # several class chunks (256..4096 classes each)
def test_ties_are_broken_by_class_id_across_chunks(c):
    # Many classes share a centre, so their scores tie. The centres are scaled one-hot vectors: every dot
    # product has one non-zero term and is exact in any summation order, so the ties are exact in both
    # implementations, and the smaller ids must come first whichever chunk they are in.
    g = torch.Generator().manual_seed(c)
    centres = torch.eye(12, dtype=torch.float64)[:7] * torch.arange(1, 8, dtype=torch.float64).unsqueeze(1)
    w = centres[torch.randint(0, 7, (c,), generator=g)]
    x = torch.randn(5, 12, generator=g, dtype=torch.float64)
    got = oclear_ext.hardest_classes(x, w, c // 3)
    want = reference.hardest_classes(x, w, c // 3)
    assert torch.equal(got[1], want[1])
    same_score = got[0][1:] == got[0][:-1]
    assert same_score.any() and (got[1][1:][same_score] > got[1][:-1][same_score]).all()


def test_k_equal_to_all_classes_sorts_every_class():
    x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(50, 4, dtype=torch.float64)
    scores, ids = oclear_ext.hardest_classes(x, w, 50)
    assert sorted(ids.tolist()) == list(range(50)) and (scores[:-1] >= scores[1:]).all()
    assert oclear_ext.hardest_classes(x, w, 0)[1].shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_selects_classes_as_hard_as_the_reference(dtype):
    # Rounding may reorder near-ties; the selection must still be as hard: each returned score equals the
    # float64 score of that class, and the k-th score matches the float64 k-th score, within rounding.
    g = torch.Generator().manual_seed(0)
    x64, w64 = torch.randn(64, 32, generator=g, dtype=torch.float64), torch.randn(3000, 32, generator=g, dtype=torch.float64)
    exact = (torch.nn.functional.normalize(x64, dim=1) @ torch.nn.functional.normalize(w64, dim=1).t()).max(0).values
    scores, ids = oclear_ext.hardest_classes(x64.to(dtype), w64.to(dtype), 300)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(scores.double(), exact[ids], rtol=0, atol=tol)
    kth = torch.sort(exact, descending=True).values[299]
    assert abs(scores[-1].item() - kth.item()) <= tol


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(k=-1), ValueError, r"k must be in \[0, 20\] \(20 classes, 0 excluded\), got -1"),
        (dict(k=19, exclude=torch.tensor([0, 5])), ValueError, r"k must be in \[0, 18\]"),
        (dict(k=3, exclude=torch.tensor([20])), IndexError, r"exclude\[0\] = 20 is not a class id in \[0, 20\)"),
        (dict(k=3, exclude=torch.tensor([-100])), IndexError, r"is not a class id"),
        (dict(k=3, exclude=torch.tensor([1.0])), TypeError, r"exclude must be a 1-D int64 tensor"),
        (dict(k=3, w=torch.randn(20, 4, dtype=torch.float64)), TypeError, r"weight must have the embeddings. dtype"),
        (dict(k=3, w=torch.randn(20, 5)), ValueError, r"weight must have shape \(C, D\) with the embeddings' D = 4"),
        (dict(k=3, x=torch.randn(0, 4)), ValueError, r"at least one embedding row"),
        (dict(k=3, x=torch.randint(0, 3, (2, 4))), TypeError, r"embeddings must be float32"),
    ],
)
def test_bad_input_raises_named_error(kwargs, error, match):
    x = kwargs.pop("x", torch.randn(3, 4))
    w = kwargs.pop("w", torch.randn(20, 4))
    with pytest.raises(error, match=r"oclear_ext.hardest_classes: .*" + match):
        oclear_ext.hardest_classes(x, w, **kwargs)


def test_unsorted_exclude_is_rejected_by_the_op():
    with pytest.raises(ValueError, match="exclude must be sorted and without duplicates"):
        torch.ops.oclear.class_topk(torch.randn(2, 3), torch.randn(9, 3), torch.tensor([4, 2]), 2)


def test_opcheck():
    x, w = torch.randn(6, 5), torch.randn(300, 5)
    torch.library.opcheck(torch.ops.oclear.class_topk.default, (x, w, torch.tensor([1, 7, 299]), 40))


def test_fused_backend_is_cuda_only():
    with oclear_ext.margin_softmax_options(backend="cutlass_sm90"):
        with pytest.raises(ValueError, match=r"hardest_classes: backend='cutlass_sm90' selects CUDA kernels"):
            oclear_ext.hardest_classes(torch.randn(3, 8), torch.randn(20, 8), 2)

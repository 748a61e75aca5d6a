"""Hardest-class scoring op on CUDA: same classes, same order as the CPU op; errors; top-k negatives.

Skipped without CUDA; `OCLEAR_CUDA_TEST_DEVICE=cpu` dry-runs the test code on the CPU kernels.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from cuda_cases import DEVICE, class_chunk, skip_without_device

import oclear_ext
from oclear_ext import TopKNegatives

pytestmark = skip_without_device
CLASS_TOPK = torch.ops.oclear.class_topk.default


@given(
    n=st.integers(1, 20),
    c=st.integers(1, 400),
    d=st.integers(2, 16),
    t=st.sampled_from([None, 1, 7, 64]),
    k_fraction=st.floats(0.0, 1.0),
    exclude_count=st.integers(0, 30),
    seed=st.integers(0, 2**16),
)
def test_float64_matches_cpu_op(n, c, d, t, k_fraction, exclude_count, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    exclude = torch.randint(0, c, (min(exclude_count, c),), generator=g)
    k = int(k_fraction * (c - torch.unique(exclude).numel()))
    want = oclear_ext.hardest_classes(x, w, k, exclude=exclude)
    with class_chunk(t):
        got = oclear_ext.hardest_classes(x.to(DEVICE), w.to(DEVICE), k, exclude=exclude.to(DEVICE))
    assert got[1].device.type == DEVICE.type
    assert torch.equal(got[1].cpu(), want[1])
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", [None, 100, 333])
def test_ties_broken_by_class_id_across_chunks(t):
    # Scaled one-hot centres: exact ties in any summation order, across many chunks.
    g = torch.Generator().manual_seed(3)
    centres = torch.eye(12, dtype=torch.float64)[:7] * torch.arange(1, 8, dtype=torch.float64).unsqueeze(1)
    w = centres[torch.randint(0, 7, (5000,), generator=g)]
    x = torch.randn(5, 12, generator=g, dtype=torch.float64)
    want = oclear_ext.hardest_classes(x, w, 1700, exclude=torch.tensor([0, 99, 100, 4999]))
    with class_chunk(t):
        got = oclear_ext.hardest_classes(x.to(DEVICE), w.to(DEVICE), 1700, exclude=torch.tensor([0, 99, 100, 4999], device=DEVICE))
    assert torch.equal(got[1].cpu(), want[1])


def test_nan_rows_and_classes_rank_like_the_cpu():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 8, generator=g, dtype=torch.float64)
    w = torch.randn(50, 8, generator=g, dtype=torch.float64)
    x[2] = float("nan")  # a NaN row never wins a column
    w[[3, 17]] = float("nan")  # NaN classes rank below every scored class
    want = oclear_ext.hardest_classes(x, w, 50)
    with class_chunk(16):
        got = oclear_ext.hardest_classes(x.to(DEVICE), w.to(DEVICE), 50)
    assert torch.equal(got[1].cpu(), want[1])
    assert got[1].cpu()[-2:].tolist() == [3, 17]
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_selects_classes_as_hard_as_float64(dtype):
    g = torch.Generator().manual_seed(0)
    x64, w64 = torch.randn(64, 32, generator=g, dtype=torch.float64), torch.randn(3000, 32, generator=g, dtype=torch.float64)
    exact = (torch.nn.functional.normalize(x64, dim=1) @ torch.nn.functional.normalize(w64, dim=1).t()).max(0).values
    scores, ids = oclear_ext.hardest_classes(x64.to(DEVICE, dtype), w64.to(DEVICE, dtype), 300)
    scores, ids = scores.cpu(), ids.cpu()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(scores.double(), exact[ids], rtol=0, atol=tol)
    assert abs(scores[-1].item() - torch.sort(exact, descending=True).values[299].item()) <= tol


@pytest.mark.parametrize(
    "exclude, error, match",
    [
        ([20], IndexError, r"exclude\[0\] = 20 is not a class id in \[0, 20\)"),
        ([3, -1], IndexError, r"exclude\[1\] = -1 is not a class id"),
        ([4, 2], ValueError, r"exclude must be sorted and without duplicates \(torch.unique\), got exclude\[0\] = 4 then 2"),
        ([2, 2], ValueError, r"exclude must be sorted and without duplicates"),
    ],
)
def test_bad_exclude_raises_on_device(exclude, error, match):
    with pytest.raises(error, match=r"oclear_ext.hardest_classes: " + match):
        CLASS_TOPK(torch.randn(3, 4, device=DEVICE), torch.randn(20, 4, device=DEVICE),
                   torch.tensor(exclude, device=DEVICE), 2)


def test_opcheck():
    x, w = torch.randn(6, 5, device=DEVICE), torch.randn(300, 5, device=DEVICE)
    torch.library.opcheck(CLASS_TOPK, (x, w, torch.tensor([1, 7, 299], device=DEVICE), 40))


def test_topk_negatives_loss_on_device_matches_cpu():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 16, generator=g, dtype=torch.float64)
    w = torch.randn(400, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 400, (12,), generator=g)
    want_loss, want_active = oclear_ext.margin_softmax_loss(x, w, labels, negatives=TopKNegatives(30), return_active=True)
    got_loss, got_active = oclear_ext.margin_softmax_loss(x.to(DEVICE), w.to(DEVICE), labels.to(DEVICE),
                                                          negatives=TopKNegatives(30), return_active=True)
    assert torch.equal(got_active.cpu(), want_active)
    torch.testing.assert_close(got_loss.cpu(), want_loss, rtol=1e-10, atol=1e-12)


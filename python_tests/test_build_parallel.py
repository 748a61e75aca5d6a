"""The extension's CPU kernels run on the threads torch allows (built with OpenMP, sharing torch's runtime)."""

from __future__ import annotations

import sys

import pytest
import torch

import oclear_ext  # noqa: F401  (registers torch.ops.oclear.*)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenMP is enabled for Linux builds only")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_parallel_for_uses_torch_threads(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # Without -fopenmp at::parallel_for compiles to its serial fallback: always 1 thread.
        assert torch.ops.oclear.parallel_threads_used(64) == threads
    finally:
        torch.set_num_threads(before)


def test_parallel_threads_used_rejects_bad_input():
    with pytest.raises(RuntimeError, match="items must be >= 1, got 0"):
        torch.ops.oclear.parallel_threads_used(0)

"""How the extension is built: its CPU kernels run on the threads torch allows (OpenMP, torch's runtime), and it
shares torch's C++ runtime (its error messages come out whole)."""

from __future__ import annotations

import sys

import pytest
import torch

import oclear_ext._ops  # noqa: F401  (loads the kernels: registers torch.ops.oclear.*)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenMP is enabled for Linux builds only")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_parallel_for_uses_torch_threads(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # Without -fopenmp at::parallel_for compiles to its serial fallback: always 1 thread.
        assert torch.ops.oclear._parallel_threads_used(64) == threads
    finally:
        torch.set_num_threads(before)


def test_parallel_threads_used_rejects_bad_input():
    with pytest.raises(RuntimeError, match="_parallel_threads_used: items must be >= 1, got 0"):
        torch.ops.oclear._parallel_threads_used(0)


def test_introspection_ops_are_private():
    # Introspection and tuning hooks carry a leading underscore: not API, free to change.
    for name in ("_parallel_threads_used", "_concept_attention_cpu_isa", "_cpu_output_cache_stats",
                 "_cpu_output_cache_empty", "_cpu_output_cache_set_limit"):
        assert hasattr(torch.ops.oclear, name), name
        with pytest.raises(AttributeError):
            getattr(torch.ops.oclear, name[1:])


def test_error_messages_keep_their_numbers():
    # A build that embedded a private static libstdc++ (a toolchain whose library path held only libstdc++.a)
    # formatted messages in that copy against torch's locale: the text stopped at the first number (seen on
    # this CPU machine) or the process segfaulted (seen on an H100 machine). setup.py links torch's copy.
    with pytest.raises(IndexError, match=r"oclear_ext.hardest_classes: exclude\[1\] = 20 is not a class id in \[0, 20\)"):
        oclear_ext.hardest_classes(torch.randn(3, 4), torch.randn(20, 4), 2, exclude=torch.tensor([1, 20]))

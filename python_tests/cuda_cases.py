"""Shared by the CUDA tests: the device under test, the skip rule, the class-chunk switch.

`OCLEAR_CUDA_TEST_DEVICE=cpu` points the CUDA tests at the CPU kernels: a dry run of the test code on a
machine without GPU (the CUDA-only debug switch, OCLEAR_CUDA_POISON, then does nothing).
"""

from __future__ import annotations

import os

import pytest
import torch

import oclear_ext

DEVICE = torch.device(os.environ.get("OCLEAR_CUDA_TEST_DEVICE", "cuda"))
skip_without_device = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                         reason="CUDA is not available")
# Tests of CUDA-only behaviour (the build flag, a CUDA switch, two devices, a 4 GB problem): they run on a
# GPU and are skipped in the OCLEAR_CUDA_TEST_DEVICE=cpu dry run.
cuda_only = pytest.mark.skipif(DEVICE.type != "cuda",
                               reason="CUDA-only behaviour (OCLEAR_CUDA_TEST_DEVICE=cpu dry run)")


def class_chunk(t):
    """t classes per chunk in every margin softmax / hardest_classes call inside the block (None: automatic);
    a context manager and a decorator."""
    return oclear_ext.margin_softmax_options(class_chunk=t)

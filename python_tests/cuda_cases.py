"""Shared by the CUDA tests: the device under test, the skip rule, the class-chunk switch of the CUDA glue.

`OCLEAR_CUDA_TEST_DEVICE=cpu` points the CUDA tests at the CPU kernels: a dry run of the test code on a
machine without GPU (the CUDA-only debug switches then do nothing).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("OCLEAR_CUDA_TEST_DEVICE", "cuda"))
skip_without_device = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                         reason="CUDA is not available")
# Tests of CUDA-only behaviour (the build flag, a CUDA switch, two devices, a 4 GB problem): they run on a
# GPU and are skipped in the OCLEAR_CUDA_TEST_DEVICE=cpu dry run.
cuda_only = pytest.mark.skipif(DEVICE.type != "cuda",
                               reason="CUDA-only behaviour (OCLEAR_CUDA_TEST_DEVICE=cpu dry run)")


@contextlib.contextmanager
def class_chunk(t):
    """Forces t classes per chunk in the CUDA glue inside the block (None: the default chunking)."""
    key = "OCLEAR_CUDA_CLASS_CHUNK"
    old = os.environ.get(key)
    if t is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = str(t)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old

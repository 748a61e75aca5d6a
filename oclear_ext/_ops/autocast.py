"""Autocast rules of the ops whose second operand is a class-weight matrix (margin softmax, class top-k).

torch's own rule for a GEMM casts every float32 input to the autocast dtype, which here would copy the
whole C x D class weight (up to 10^8 rows) to 16 bits on every step. Instead only the embeddings (the
activations) are cast; a float32 weight is passed as it is and the kernels round it to the embeddings'
dtype one chunk of classes at a time (the op's mixed-dtype contract: weight.dtype == embeddings.dtype, or
float32 beside 16-bit embeddings). So under autocast the GEMM operands are 16-bit, the statistics and
the loss float32, and each gradient comes back in its input's dtype (the embeddings' through the cast's
backward, an fp32 weight's float32). float64 inputs are left alone, as autocast leaves float64.
"""

from __future__ import annotations

from typing import Callable

import torch

AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def cast_activation(x: torch.Tensor, device_type: str) -> torch.Tensor:
    """x in the autocast dtype if it is a float32 tensor (what autocast casts), else unchanged."""
    if x.dtype == torch.float32:
        return x.to(torch.get_autocast_dtype(device_type))
    return x


def register_weight_preserving_autocast(qualname: str, op: Callable, num_activations: int = 1) -> None:
    """Autocast kernels (CPU and CUDA) for `qualname`: cast the first `num_activations` tensor arguments,
    leave the rest (the class weight, labels, settings) as they are, and call `op` with autocast off."""
    for device_type, key in AUTOCAST_KEYS.items():
        def kernel(*args, device_type=device_type):
            cast = [cast_activation(a, device_type) for a in args[:num_activations]]
            with torch.autocast(device_type, enabled=False):
                return op(*cast, *args[num_activations:])

        torch.library.impl(qualname, key)(kernel)

"""Loads the compiled kernels (oclear_ext._C) after checking they were built for this torch."""

from __future__ import annotations

import torch

REBUILD = "rebuild with `pip install --no-build-isolation .` (or `-e .`) from the repository root"


def load_extension() -> dict:
    """Imports oclear_ext._C, which registers the torch.ops.oclear.* kernels; returns the build info."""
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        raise ImportError(f"oclear_ext's kernels have not been built: {REBUILD}") from None
    if BUILD_INFO["torch_version"] != torch.__version__:
        raise ImportError(
            f"oclear_ext was built against torch {BUILD_INFO['torch_version']} but torch {torch.__version__} "
            f"is installed; C++ extensions are tied to the torch they were compiled with: {REBUILD}"
        )
    try:
        from . import _C  # noqa: F401  (import side effect: op registration)
    except ImportError as err:
        raise ImportError(f"oclear_ext._C failed to load ({err}): {REBUILD}") from err
    return BUILD_INFO

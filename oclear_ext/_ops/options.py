"""Defaults of the class-walking ops' tuning arguments, set for a block of code.

    with oclear_ext.margin_softmax_options(class_chunk=4096, check_labels=False):
        loss = head(embeddings, labels)          # every margin softmax / hardest_classes call in the block

In the style of torch.nn.attention.sdpa_kernel: a context manager (also usable as a decorator) that
changes what the Python wrappers pass to the ops as arguments, so torch.compile sees the values as
constants of the traced call (it recompiles if they change) and no C++ code reads global state. An
argument given to a call (margin_softmax_loss(..., class_chunk=...)) wins over the block's default.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

_UNSET = object()


@dataclass(frozen=True)
class ClassLoopOptions:
    class_chunk: int | None = None   # classes per chunk of the kernels' class loop; None = chosen from N, D
    check_labels: bool = True        # range-check labels (on CUDA: one host synchronisation per call)
    backend: str = "auto"            # margin-softmax kernels: "auto", "chunked" or "cutlass_sm90"
    backward: str = "recompute"      # margin-softmax backward: "recompute" or "store" (keeps N x C bf16 E')
    store_budget_bytes: int = 4 << 30  # the largest E' that backward="store" may keep


MARGIN_BACKENDS = ("auto", "chunked", "cutlass_sm90")


MARGIN_BACKWARDS = ("recompute", "store")


def check_margin_backward(backward: object, where: str) -> str:
    if not isinstance(backward, str) or backward not in MARGIN_BACKWARDS:
        raise ValueError(f"{where}: backward must be one of {', '.join(map(repr, MARGIN_BACKWARDS))}, got {backward!r}")
    return backward


def check_margin_backend(backend: object, where: str) -> str:
    if not isinstance(backend, str) or backend not in MARGIN_BACKENDS:
        raise ValueError(f"{where}: backend must be one of {', '.join(map(repr, MARGIN_BACKENDS))}, got {backend!r}")
    return backend


_current = ClassLoopOptions()


def current_options() -> ClassLoopOptions:
    return _current


@contextlib.contextmanager
def margin_softmax_options(*, class_chunk=_UNSET, check_labels=_UNSET, backend=_UNSET, backward=_UNSET,
                           store_budget_bytes=_UNSET):
    """Sets the default class_chunk (a positive int, or None for automatic) and check_labels (bool) of the
    margin softmax ops and hardest_classes inside the block, and the margin softmax's kernel family
    `backend`: "auto" (the verified kernels of the device: today the CPU kernels, or on CUDA the chunked
    path), "chunked" (cuBLAS GEMM per class chunk + epilogue kernels on CUDA; the CPU kernels on CPU) or
    "cutlass_sm90" (the fused CUTLASS GEMMs: CUDA compute capability 9.0, bfloat16, a build with 9.0a;
    any other call raises, naming why); `backward`: "recompute" (the logits are recomputed in the backward) or
    "store" (backend "cutlass_sm90" only: the forward keeps the bf16 N x C values E' = exp(s cos - s) / |w|
    and the backward runs two GEMMs instead of three; refused above `store_budget_bytes`, 4 GiB by default,
    or when the values do not fit in the device's memory). Nested blocks restore the outer values."""
    global _current
    changes = {}
    if class_chunk is not _UNSET:
        if class_chunk is not None and (not isinstance(class_chunk, int) or isinstance(class_chunk, bool) or class_chunk < 1):
            raise ValueError(f"margin_softmax_options: class_chunk must be a positive int or None, got {class_chunk!r}")
        changes["class_chunk"] = class_chunk
    if check_labels is not _UNSET:
        if not isinstance(check_labels, bool):
            raise TypeError(f"margin_softmax_options: check_labels must be a bool, got {check_labels!r}")
        changes["check_labels"] = check_labels
    if backend is not _UNSET:
        changes["backend"] = check_margin_backend(backend, "margin_softmax_options")
    if backward is not _UNSET:
        changes["backward"] = check_margin_backward(backward, "margin_softmax_options")
    if store_budget_bytes is not _UNSET:
        if not isinstance(store_budget_bytes, int) or isinstance(store_budget_bytes, bool) or store_budget_bytes < 0:
            raise ValueError(f"margin_softmax_options: store_budget_bytes must be an int >= 0, got {store_budget_bytes!r}")
        changes["store_budget_bytes"] = store_budget_bytes
    outer = _current
    _current = replace(outer, **changes)
    try:
        yield _current
    finally:
        _current = outer

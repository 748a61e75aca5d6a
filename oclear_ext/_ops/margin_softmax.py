"""Python side of the fused margin softmax: settings, fake kernels, autograd, the public loss.

The C++ op `oclear::margin_softmax_forward` returns, for the weight rows it is given (a block of
classes starting at `class_start`), the per-row log-sum-exp of the logits and the target logit:

    lse_i    = log sum_{c in block} exp(z_ic)          (the online-softmax max and sum-exp, folded)
    target_i = z_{i, y_i} if y_i is in the block, else 0

so the loss of one block covering all classes is  lse_i - target_i,  and blocks held by different
processes combine by a log-sum-exp of their lse and a sum of their targets. Folding max and sum-exp
into lse keeps the op differentiable in the ordinary sense: dLoss/dz_ic = grad_lse_i * softmax_ic
+ grad_target_i * [c == y_i], which is what `oclear::margin_softmax_backward` evaluates tile by tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from numbers import Real

import torch
from torch import Tensor

from .autocast import register_weight_preserving_autocast
from .options import check_margin_backend, check_margin_backward, current_options
from .negatives import LOCAL_IGNORE, Negatives, active_classes, restrict_to_active

OP_NAME = "oclear_ext.margin_softmax_loss"
REDUCTIONS = ("mean", "sum", "none")
ARCFACE_GRADS = ("exact", "straight_through")


@dataclass(frozen=True)
class MarginSettings:
    """Validated settings of a margin softmax (everything but the tensors).

    margin = (m1, m2, m3): the target logit is scale * (cos(m1 * theta + m2) - m3).
    """

    scale: float = 64.0
    margin: tuple[float, float, float] = (1.0, 0.0, 0.4)
    arcface_grad: str = "exact"
    interclass_filter: float | None = None
    ignore_index: int = -100
    class_chunk: int | None = None      # None: the margin_softmax_options block's (automatic by default)
    check_labels: bool | None = None    # None: the margin_softmax_options block's (True by default)
    backend: str | None = None          # None: the margin_softmax_options block's ("auto" by default)
    backward: str | None = None         # None: the margin_softmax_options block's ("recompute" by default)

    def __post_init__(self) -> None:
        if not isinstance(self.scale, Real) or isinstance(self.scale, bool):
            raise TypeError(f"{OP_NAME}: scale must be a real number, got {self.scale!r}")
        if not math.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(f"{OP_NAME}: scale must be a finite number > 0, got {self.scale}")
        margin = tuple(self.margin) if isinstance(self.margin, (tuple, list)) else None
        if margin is None or len(margin) != 3 or not all(isinstance(m, Real) for m in margin):
            raise ValueError(f"{OP_NAME}: margin must be a tuple of three numbers (m1, m2, m3), got {self.margin!r}")
        object.__setattr__(self, "margin", tuple(float(m) for m in margin))
        object.__setattr__(self, "scale", float(self.scale))
        if self.arcface_grad not in ARCFACE_GRADS:
            raise ValueError(f"{OP_NAME}: arcface_grad must be one of {ARCFACE_GRADS}, got {self.arcface_grad!r}")
        if self.interclass_filter is not None and not isinstance(self.interclass_filter, Real):
            raise TypeError(f"{OP_NAME}: interclass_filter must be a number or None, got {self.interclass_filter!r}")
        if not isinstance(self.ignore_index, int) or isinstance(self.ignore_index, bool):
            raise TypeError(f"{OP_NAME}: ignore_index must be an int, got {self.ignore_index!r}")
        if self.class_chunk is not None and (not isinstance(self.class_chunk, int) or isinstance(self.class_chunk, bool)
                                             or self.class_chunk < 1):
            raise ValueError(f"{OP_NAME}: class_chunk must be a positive int or None (automatic), got {self.class_chunk!r}")
        if self.check_labels is not None and not isinstance(self.check_labels, bool):
            raise TypeError(f"{OP_NAME}: check_labels must be a bool or None, got {self.check_labels!r}")
        if self.backend is not None:
            check_margin_backend(self.backend, OP_NAME)
        if self.backward is not None:
            check_margin_backward(self.backward, OP_NAME)
        # Ranges of m1, m2, m3 and the filter are checked in C++ (csrc/include/oclear/checks.h),
        # once for every backend.

    def op_args(self) -> tuple:
        """The trailing positional arguments of the private ops, after class_start and num_classes; the
        tuning arguments left None take the enclosing margin_softmax_options block's values."""
        m1, m2, m3 = self.margin
        filt = None if self.interclass_filter is None else float(self.interclass_filter)
        block = current_options()
        chunk = self.class_chunk if self.class_chunk is not None else block.class_chunk
        check = self.check_labels if self.check_labels is not None else block.check_labels
        backend = self.backend if self.backend is not None else block.backend
        return (self.scale, m1, m2, m3, filt, self.ignore_index, self.arcface_grad == "straight_through",
                chunk or 0, check, backend)


    def backward_mode(self) -> str:
        return self.backward if self.backward is not None else current_options().backward


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP_NAME}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce_rows(per_row: Tensor, valid: Tensor, reduction: str, num_valid: Tensor | None = None) -> Tensor:
    """Applies `reduction` to per-row losses; ignored rows contribute 0.

    `num_valid` is the mean's denominator (the number of non-ignored rows of the global batch when
    the batch is spread over processes; defaults to `valid.sum()`). A mean over zero valid rows is 0,
    with zero gradient, rather than F.cross_entropy's NaN, so a fully ignored batch cannot poison a run.
    """
    per_row = torch.where(valid, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if num_valid is None:
        num_valid = valid.sum()
    return per_row.sum() / num_valid.clamp_min(1).to(per_row.dtype)


def check_same_device(**tensors: Tensor) -> None:
    """The device rule of the C++ glue, for the fake (meta) kernels too."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        found = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{OP_NAME}: {', '.join(devices)} must be on one device, got {found}")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("oclear::margin_softmax_forward")
def _forward_fake(embeddings, weight, labels, class_start, num_classes, scale, m1, m2, m3,
                  interclass_filter, ignore_index, straight_through, class_chunk=0, check_labels=True,
                  backend="auto"):
    check_same_device(embeddings=embeddings, weight=weight, labels=labels)
    torch._check(embeddings.dim() == 2 and weight.dim() == 2, lambda: f"{OP_NAME}: embeddings and weight must be 2-D")
    torch._check(weight.shape[1] == embeddings.shape[1], lambda: f"{OP_NAME}: weight and embeddings differ in D")
    acc = _accumulation_dtype(embeddings.dtype)
    n, c = embeddings.shape[0], weight.shape[0]
    return embeddings.new_empty(n, dtype=acc), embeddings.new_empty(n, dtype=acc), embeddings.new_empty(c, dtype=acc)


@torch.library.register_fake("oclear::margin_softmax_backward")
def _backward_fake(grad_lse, grad_target, embeddings, weight, labels, lse, weight_inv_norm, class_start,
                   num_classes, scale, m1, m2, m3, interclass_filter, ignore_index, straight_through,
                   class_chunk, check_labels, backend, need_grad_embeddings, need_grad_weight):
    grad_x = torch.empty_like(embeddings, memory_format=torch.contiguous_format) if need_grad_embeddings else embeddings.new_empty(0)
    grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_grad_weight else weight.new_empty(0)
    return grad_x, grad_w


_TUNING_DEFAULTS = (0, True, "auto")  # class_chunk, check_labels, backend in the forward schema


def _setup_context(ctx, inputs, output) -> None:
    embeddings, weight, labels, *settings = inputs
    lse, _target, weight_inv_norm = output
    ctx.save_for_backward(embeddings, weight, labels, lse, weight_inv_norm)
    # class_start, num_classes, scale, m1, m2, m3, filter, ignore_index, straight_through, class_chunk, check_labels,
    # backend; the last three have schema defaults, which a traced call may leave out: the backward op takes them all.
    ctx.settings = (*settings, *_TUNING_DEFAULTS[len(settings) - 9:])


def _backward(ctx, grad_lse, grad_target, _grad_weight_inv_norm):
    embeddings, weight, labels, lse, weight_inv_norm = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    grad_target = torch.zeros_like(lse) if grad_target is None else grad_target
    grad_x, grad_w = torch.ops.oclear.margin_softmax_backward(
        grad_lse, grad_target, embeddings, weight, labels, lse, weight_inv_norm, *ctx.settings, need_x, need_w
    )
    no_grads = (None,) * len(ctx.settings)
    return (grad_x if need_x else None, grad_w if need_w else None, None, *no_grads)


torch.library.register_autograd("oclear::margin_softmax_forward", _backward, setup_context=_setup_context)
register_weight_preserving_autocast("oclear::margin_softmax_forward", torch.ops.oclear.margin_softmax_forward)


@torch.library.register_fake("oclear::margin_softmax_forward_stored")
def _forward_stored_fake(embeddings, weight, labels, class_start, num_classes, scale, m1, m2, m3,
                         interclass_filter, ignore_index, straight_through, class_chunk=0, check_labels=True,
                         backend="cutlass_sm90"):
    lse, target, w_inv = _forward_fake(embeddings, weight, labels, class_start, num_classes, scale, m1, m2, m3,
                                       interclass_filter, ignore_index, straight_through)
    c = weight.shape[0]
    # The kernel's E' rows start at 8-element (16-byte) multiples, for TMA: a view of that width.
    return lse, target, w_inv, embeddings.new_empty_strided((embeddings.shape[0], c), ((c + 7) // 8 * 8, 1))


@torch.library.register_fake("oclear::margin_softmax_backward_stored")
def _backward_stored_fake(grad_lse, grad_target, embeddings, weight, labels, lse, weight_inv_norm, stored_exp,
                          *settings_and_needs):
    *settings, need_x, need_w = settings_and_needs
    return _backward_fake(grad_lse, grad_target, embeddings, weight, labels, lse, weight_inv_norm, *settings,
                          need_x, need_w)


_STORED_DEFAULTS = (0, True, "cutlass_sm90")


def _setup_stored_context(ctx, inputs, output) -> None:
    embeddings, weight, labels, *settings = inputs
    lse, _target, weight_inv_norm, stored = output
    ctx.save_for_backward(embeddings, weight, labels, lse, weight_inv_norm, stored)
    ctx.settings = (*settings, *_STORED_DEFAULTS[len(settings) - 9:])


def _backward_stored(ctx, grad_lse, grad_target, _grad_weight_inv_norm, _grad_stored):
    embeddings, weight, labels, lse, weight_inv_norm, stored = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    grad_target = torch.zeros_like(lse) if grad_target is None else grad_target
    grad_x, grad_w = torch.ops.oclear.margin_softmax_backward_stored(
        grad_lse, grad_target, embeddings, weight, labels, lse, weight_inv_norm, stored, *ctx.settings, need_x, need_w
    )
    return (grad_x if need_x else None, grad_w if need_w else None, None, *(None,) * len(ctx.settings))


torch.library.register_autograd("oclear::margin_softmax_forward_stored", _backward_stored,
                                setup_context=_setup_stored_context)
register_weight_preserving_autocast("oclear::margin_softmax_forward_stored",
                                   torch.ops.oclear.margin_softmax_forward_stored)


def margin_softmax_loss(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float = 64.0,
    margin: tuple[float, float, float] = (1.0, 0.0, 0.4),
    arcface_grad: str = "exact",
    interclass_filter: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    negatives: Negatives | None = None,
    return_active: bool = False,
    class_chunk: int | None = None,
    check_labels: bool | None = None,
    backend: str | None = None,
    backward: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Normalised margin softmax cross-entropy, fused: never materialises the N x C logits.

    Args:
        embeddings: (N, D) float32 | float64 | bfloat16 | float16; normalised inside.
        weight: (C, D) class centres, the embeddings' dtype, or float32 beside 16-bit embeddings (an fp32
            master classifier: its rows are rounded to the embeddings' dtype chunk by chunk, its gradient
            stays float32); normalised inside (no normalised copy is made). Under torch.autocast the
            embeddings are cast to the autocast dtype and the weight is kept as it is (oclear_ext/_ops/autocast.py).
        labels: (N,) int64 class ids in [0, C), or `ignore_index`.
        scale: s > 0, the logit scale.
        margin: (m1, m2, m3); the target logit is s * (cos(m1 * theta + m2) - m3) (insightface's combined
            margin: CosFace (1, 0, m), ArcFace (1, m, 0), SphereFace (m, 0, 0)); past m1 * theta + m2 = pi
            it continues linearly and monotonically.
        arcface_grad: "exact" differentiates the margin (sin(theta) floored at 1e-4); "straight_through"
            passes the gradient of the target cosine through unchanged (insightface's behaviour).
        interclass_filter: negatives whose cosine exceeds this threshold count as cos = 0 and get no gradient.
        ignore_index: rows with this label contribute nothing.
        reduction: "mean" (over non-ignored rows; 0 if there are none), "sum" or "none" (per row, 0 for ignored).
        negatives: None (all classes, exact), RandomNegatives or TopKNegatives: the softmax then runs over the
            batch's positive classes plus the sampled negatives only (oclear_ext/_ops/negatives.py).
        return_active: also return the sorted active class ids (all classes when negatives is None).
        class_chunk: classes per chunk of the kernels' class loop (None: the oclear_ext.margin_softmax_options
            block's, automatic by default: chosen from N and D). Results do not depend on it beyond rounding.
        check_labels: range-check the labels (a clear error for a label outside [0, C)); None: the block's,
            True by default. On CUDA the check reads one flag back to the host, a stream synchronisation per
            call: pass False in a training loop whose labels are valid by construction (the kernels never use
            a label as an address, so a bad label cannot corrupt memory; it only yields a wrong loss).
        backend: the kernel family (None: the margin_softmax_options block's, "auto" by default): "auto",
            "chunked" or "cutlass_sm90", the fused CUTLASS GEMMs for Hopper (bfloat16, compute capability 9.0,
            a build with 9.0a; not yet verified on a GPU, so "auto" does not pick it). A backend that cannot
            run the call raises, naming why.
        backward: "recompute" (default) or "store" (backend "cutlass_sm90" only; None: the block's): the
            forward keeps the bf16 N x C values exp(s cos - s) / |w_c| so that the backward needs no logit
            GEMM; refused above margin_softmax_options' store_budget_bytes (4 GiB by default) or when the
            values do not fit in the device's memory.

    Returns:
        The loss: a scalar, or (N,) for reduction="none"; float32 for 16-bit inputs (the statistics are
        accumulated in float32), float64 for float64. With return_active, (loss, active class ids).
    """
    settings = MarginSettings(scale, margin, arcface_grad, interclass_filter, ignore_index, class_chunk, check_labels,
                              backend, backward)
    check_reduction(reduction)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"{OP_NAME}: weight must be a 2-D tensor (C, D), got {getattr(weight, 'shape', weight)!r}")
    if negatives is None:
        loss = _full_loss(embeddings, weight, labels, settings, reduction)
        return (loss, torch.arange(weight.shape[0], device=weight.device)) if return_active else loss
    loss, active = sampled_loss(embeddings, weight, labels, settings, reduction, negatives)
    return (loss, active) if return_active else loss


def _full_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, settings: MarginSettings, reduction: str) -> Tensor:
    if settings.backward_mode() == "store":
        need = 2 * embeddings.shape[0] * weight.shape[0]
        budget = current_options().store_budget_bytes
        if need > budget:
            raise ValueError(f"{OP_NAME}: backward='store' would keep {need / 2**20:.0f} MiB of bf16 values "
                             f"(N = {embeddings.shape[0]} x C = {weight.shape[0]}), above store_budget_bytes = "
                             f"{budget / 2**20:.0f} MiB: raise it with margin_softmax_options or use backward='recompute'")
        lse, target, _, _ = torch.ops.oclear.margin_softmax_forward_stored(
            embeddings, weight, labels, 0, weight.shape[0], *settings.op_args()
        )
        return reduce_rows(lse - target, labels != settings.ignore_index, reduction)
    lse, target, _ = torch.ops.oclear.margin_softmax_forward(
        embeddings, weight, labels, 0, weight.shape[0], *settings.op_args()
    )
    return reduce_rows(lse - target, labels != settings.ignore_index, reduction)


def head_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, settings: MarginSettings, reduction: str,
              negatives: Negatives | None, sparse_grad: bool = False) -> tuple[Tensor, Tensor | None]:
    """(loss, active class ids or None without sampling): the forward of the classifier modules."""
    if negatives is None:
        return _full_loss(embeddings, weight, labels, settings, reduction), None
    return sampled_loss(embeddings, weight, labels, settings, reduction, negatives, sparse_grad)


def sampled_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, settings: MarginSettings, reduction: str,
                 negatives: Negatives, sparse_grad: bool = False) -> tuple[Tensor, Tensor]:
    """(the loss over the batch's positives plus sampled negatives, the sorted active class ids).

    The active rows are gathered (F.embedding, row-sparse weight gradient with sparse_grad) and the labels
    renumbered to positions among them; ignored rows become LOCAL_IGNORE, a negative id, so a user
    ignore_index >= 0 can never collide with a position.
    """
    active = active_classes(negatives, embeddings, weight, labels, settings.ignore_index)
    rows, local_labels = restrict_to_active(weight, labels, active, labels != settings.ignore_index, sparse_grad)
    loss = _full_loss(embeddings, rows, local_labels, replace(settings, ignore_index=LOCAL_IGNORE), reduction)
    return loss, active

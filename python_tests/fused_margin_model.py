"""A CPU model of the fused margin-softmax algorithm (backend "cutlass_sm90"), step for step.

It mirrors csrc/ops/margin_softmax_fused_cuda.cpp and the kernels it drives, on the same tiling and in the
same precisions, so the tests (test_fused_margin_model.py) can check the whole algorithm against the
float64 reference without a GPU: the fixed shift and its true-max fallback, the masked target column and its
float64 per-row terms, the per-(row, 256-class tile) partials and their merge order, the class chunks of
the backward, the weight projection through r_c, and the store-E variant (the forward keeping bf16
E * w_inv so the backward needs no recompute GEMM). The per-element functions are those of
csrc/include/oclear/fused_margin.h; the GEMMs are float64 products rounded to float32 (the tensor cores
accumulate bf16 products exactly in float32 up to rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from oclear_ext.reference.margin_softmax import target_cos, target_cos_grad

TILE_ROWS, TILE_CLASSES = 128, 256
LOG2E = 1.0 / math.log(2.0)
NORM_EPS = 1e-12


@dataclass(frozen=True)
class Margin:
    scale: float = 64.0
    m: tuple[float, float, float] = (1.0, 0.0, 0.4)
    interclass_filter: float | None = None
    straight_through: bool = False


def bf16(t: Tensor) -> Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


def flush(t: Tensor) -> Tensor:
    """The device's exp2 (ex2.approx.ftz) flushes results below 2^-126 to zero."""
    return torch.where(t < 2.0 ** -126, torch.zeros_like(t), t)


def gemm(a: Tensor, b_t: Tensor) -> Tensor:
    """bf16 operands, float32 result: a @ b_t.T."""
    return (a.double() @ b_t.double().T).float()


def normalise(x: Tensor) -> tuple[Tensor, Tensor]:
    inv = 1.0 / x.double().norm(dim=1).clamp_min(NORM_EPS)
    return bf16((x.double() * inv[:, None]).float()), inv.float()


def label_columns(labels: Tensor, class_start: int, classes: int, ignore_index: int) -> Tensor:
    local = labels - class_start
    inside = (local >= 0) & (local < classes) & (labels != ignore_index)
    return torch.where(inside, local, torch.full_like(local, -1))


def target_terms(x_hat, w, w_inv, cols, mg: Margin):
    """The per-row target kernel: float32 dot, float64 margin. (logit, cos, exp(z - s)) or zeros."""
    has = cols >= 0
    safe = cols.clamp_min(0)
    raw = (x_hat.double() * w[safe].double()).sum(1).float()
    cos = (raw * w_inv[safe]).clamp(-1, 1).double()
    z = mg.scale * target_cos(cos, *mg.m)
    zero = torch.zeros_like(z)
    return (torch.where(has, z, zero), torch.where(has, cos, zero), torch.where(has, torch.exp(z - mg.scale), zero))


def negative_logits(cos: Tensor, mg: Margin) -> Tensor:
    z = mg.scale * cos
    if mg.interclass_filter is not None:
        z = torch.where(cos > mg.interclass_filter, torch.zeros_like(z), z)
    return z


def forward(x: Tensor, w_rows: Tensor, labels: Tensor, mg: Margin, class_start: int = 0, ignore_index: int = -100,
            store_e: bool = False):
    """(lse, target_logit, w_inv, stored E' or None, rows that took the true max)."""
    n, classes = x.shape[0], w_rows.shape[0]
    x_hat, _ = normalise(x)
    w = bf16(w_rows.float())
    w_inv = (1.0 / w.double().norm(dim=1).clamp_min(NORM_EPS)).float()
    cols = label_columns(labels, class_start, classes, ignore_index)
    z_t, _, e_t = target_terms(x_hat, w, w_inv, cols, mg)
    raw = gemm(x_hat, w)
    cos = (raw * w_inv).clamp(-1, 1)
    k = torch.tensor(mg.scale * LOG2E, dtype=torch.float32)
    e = flush(torch.exp2(k * cos - k))
    if mg.interclass_filter is not None:
        e = torch.where(cos > mg.interclass_filter, torch.exp2(-k), e)
    is_target = torch.arange(classes)[None, :] == cols[:, None]
    e = torch.where(is_target, torch.zeros_like(e), e)
    tiles = -(-classes // TILE_CLASSES)
    padded = torch.zeros(n, tiles * TILE_CLASSES)
    padded[:, :classes] = e
    partial = padded.view(n, tiles, TILE_CLASSES).sum(2)  # float32 per (row, class tile)
    total = torch.zeros(n, dtype=torch.float64)
    for t in range(tiles):  # tile order, float64: fused_margin.h's merge_partials
        total += partial[:, t].double()
    total += e_t
    true_max = ~(total >= classes * 2.0 ** -102)
    lse = mg.scale + torch.log(total)
    if true_max.any():  # the rare path: a true max over float32 logits, the target's from the target kernel
        z = negative_logits(cos, mg).double()
        z = torch.where(is_target, z_t[:, None].expand_as(z), z)
        lse = torch.where(true_max, torch.logsumexp(z, dim=1), lse)
    stored = None
    if store_e:  # E' = bf16(E * w_inv); filtered negatives store 0 (no gradient), the target column 0
        e_grad = e if mg.interclass_filter is None else torch.where(cos > mg.interclass_filter, torch.zeros_like(e), e)
        stored = bf16(e_grad * w_inv)
    return lse.float(), z_t.float(), w_inv, stored, true_max


def _row_inputs(x_hat, w, w_inv, cols, lse, grad_lse, grad_target, mg: Margin):
    _, cos_t, _ = target_terms(x_hat, w, w_inv, cols, mg)
    psi_grad = torch.ones_like(cos_t) if mg.straight_through else target_cos_grad(cos_t, *mg.m[:2])
    z_t = mg.scale * target_cos(cos_t, *mg.m)
    gt = (grad_lse.double() * torch.exp(z_t - lse.double()) + grad_target.double()) * mg.scale * psi_grad
    gt = torch.where(cols >= 0, gt, torch.zeros_like(gt)).float()
    return (lse.double() * LOG2E).float(), (grad_lse.double() * mg.scale).float(), gt


def _recomputed_grad(raw: Tensor, w_inv: Tensor, lse2: Tensor, gs: Tensor, k: Tensor, mg: Margin) -> Tensor:
    """The recompute epilogue's B for the negatives (the target column is set by the caller), float32."""
    cos = (raw * w_inv).clamp(-1, 1)
    b = torch.exp2(k * cos - lse2[:, None]) * gs[:, None] * w_inv
    if mg.interclass_filter is not None:
        b = torch.where(cos > mg.interclass_filter, torch.zeros_like(b), b)
    return b


def _project_weight(e_rows: Tensor, w: Tensor, w_inv: Tensor, r: Tensor) -> Tensor:
    beta = torch.where(w_inv * NORM_EPS < 1, (-(w_inv.double() ** 2) * r).float(), torch.zeros_like(w_inv))
    return bf16(e_rows + beta[:, None] * w)


def _embedding_grad(x: Tensor, grad_x_hat: Tensor) -> Tensor:
    x_hat, x_inv = normalise(x)
    g = grad_x_hat.double()
    xh = x.double() * (1.0 / x.double().norm(dim=1).clamp_min(NORM_EPS))[:, None]
    return ((g - xh * (xh * g).sum(1, keepdim=True)) * x_inv.double()[:, None]).float()


def backward(x, w_rows, labels, lse, grad_lse, grad_target, mg: Margin, class_start=0, ignore_index=-100,
             chunk=16384, stored=None):
    """(grad_x, grad_w): recompute mode per class chunk, or, with `stored` (the forward's E'), store-E mode."""
    n, classes = x.shape[0], w_rows.shape[0]
    x_hat, _ = normalise(x)
    w = bf16(w_rows.float())
    w_inv = (1.0 / w.double().norm(dim=1).clamp_min(NORM_EPS)).float()
    cols = label_columns(labels, class_start, classes, ignore_index)
    lse2, gs, gt = _row_inputs(x_hat, w, w_inv, cols, lse, grad_lse, grad_target, mg)
    k = torch.tensor(mg.scale * LOG2E, dtype=torch.float32)
    grad_x_hat = torch.zeros(n, x.shape[1])
    grad_w = torch.empty(classes, x.shape[1])
    chunk = -(-chunk // TILE_CLASSES) * TILE_CLASSES
    for c0 in range(0, classes, chunk):
        t = min(chunk, classes - c0)
        wc, wic = w[c0:c0 + t], w_inv[c0:c0 + t]
        is_target = (torch.arange(c0, c0 + t)[None, :] == cols[:, None])
        if stored is None:  # recompute: the epilogue's recompute_grad, rounded to bf16 by the store
            raw = gemm(x_hat, wc)
            b = _recomputed_grad(raw, wic, lse2, gs, k, mg)
        else:  # store-E: dS = diag(s g e^(s - lse)) E', the target column added from its row value
            a = (gs.double() * torch.exp(mg.scale - lse.double())).float()
            b = a[:, None] * stored[:, c0:c0 + t]
            # Rows whose E' the flush lost (fused_margin.h's stored_row_lost) recompute their logits.
            lost = ~(torch.exp(lse.double() - mg.scale) >= classes * 2.0 ** -101)
            if lost.any():
                b[lost] = _recomputed_grad(gemm(x_hat[lost], wc), wic, lse2[lost], gs[lost], k, mg)
        b = bf16(torch.where(is_target, gt[:, None] * wic, b))
        grad_x_hat += gemm(b, wc.T.contiguous())
        e_rows = gemm(b.T.contiguous(), x_hat.T.contiguous())
        if stored is None:  # r_c = sum_i B_ic raw_ic per row tile (float32), merged in tile order (float64)
            r = torch.zeros(t, dtype=torch.float64)
            for m0 in range(0, n, TILE_ROWS):
                r += (b[m0:m0 + TILE_ROWS] * raw[m0:m0 + TILE_ROWS]).sum(0).double()
        else:  # no logits in this mode: r_c = w_c . E_c from the float32 E chunk (kept in L2 on the GPU)
            r = (e_rows.double() * wc.double()).sum(1)
        grad_w[c0:c0 + t] = _project_weight(e_rows, wc, wic, r)
    return _embedding_grad(x, grad_x_hat), grad_w

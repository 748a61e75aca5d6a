"""Label-aware supervised contrastive loss with hard-negative weighting (the contrastive half of CLCE).

CLCE (Long et al. 2024, "CLCE: An Approach to Refining Cross-Entropy and Contrastive Learning for Optimized
Learning Fusion", arXiv 2402.14551) adds to the classification loss a label-aware contrastive loss whose
negatives are reweighted towards the hard ones. It builds on SupCon (Khosla et al. 2020, "Supervised
Contrastive Learning": every same-label row is a positive) and on importance-weighted hard negatives
(Robinson et al. 2021, "Contrastive Learning with Hard Negative Samples": negatives drawn from
q_beta(k) ~ exp(beta s_ik) instead of uniformly, estimated by reweighting a uniform batch).

For L2-normalised rows z_1..z_B with labels y (rows with y = ignore_index, or valid = False, take no part)
and s_ij = z_i . z_j / tau, anchor i has positives P(i) = {p != i : y_p = y_i} and negatives
N(i) = {k : y_k != y_i}. The hard-negative weights are

    w_ik = exp(beta s_ik) / ( (1/|N(i)|) sum_{k' in N(i)} exp(beta s_ik') )        (mean weight over N(i) = 1)

and the loss of anchor i is (the positive-vs-weighted-negatives form, one term per positive)

    l_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip) / ( exp(s_ip) + sum_{k in N(i)} w_ik exp(s_ik) ) )

    L = (1 / |A|) sum_{i in A} l_i,      A = {i taking part : |P(i)| >= 1}

Anchors without a positive are left out of the mean (they have no term to average); a batch with no such
anchor gives L = 0 with zero gradients. An anchor without negatives has l_i = 0 (nothing to separate).
beta = 0 makes every w_ik = 1: SupCon's per-positive terms with the other positives left out of each
denominator (Robinson et al.'s positive + negatives form rather than SupCon's "all a != i" one).

The weights are detached by default: they are the importance weights of the sampling distribution q_beta, a
choice of which negatives count, not something to optimise. Differentiated, their normaliser rewards raising
the similarity of the easy negatives (a larger mean lowers every weight), which works against the loss;
detached, each negative's gradient is its weight times the uniform one, which is what "more weight on hard
negatives" means. detach_weights=False differentiates through them (the exact derivative of the value).

Numerics: log-sum-exp throughout; bfloat16 / float16 inputs are computed and accumulated in float32
(float64 inputs stay float64).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def _check(features: Tensor, labels: Tensor, temperature: float, hard_negative_beta: float,
           valid: Tensor | None, name: str) -> None:
    if not isinstance(features, Tensor) or features.dim() != 2:
        raise ValueError(f"{name}: features must be a 2-D (B, D) tensor, got "
                         f"{tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__}")
    if not features.is_floating_point():
        raise ValueError(f"{name}: features must be floating point, got {features.dtype}")
    if not isinstance(labels, Tensor) or labels.shape != features.shape[:1]:
        raise ValueError(f"{name}: labels must be a ({features.shape[0]},) tensor (one per row of features), got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{name}: labels must be an integer tensor, got {labels.dtype}")
    if labels.device != features.device:
        raise ValueError(f"{name}: labels are on {labels.device}, features on {features.device}")
    if valid is not None and (not isinstance(valid, Tensor) or valid.dtype != torch.bool
                              or valid.shape != labels.shape):
        raise ValueError(f"{name}: valid must be a bool ({labels.shape[0]},) tensor or None")
    _check_settings(temperature, hard_negative_beta, name)


def _check_settings(temperature: float, hard_negative_beta: float, name: str) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"{name}: temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(hard_negative_beta, bool) or not isinstance(hard_negative_beta, (int, float)) \
            or not math.isfinite(hard_negative_beta) or hard_negative_beta < 0:
        raise ValueError(f"{name}: hard_negative_beta must be a finite number >= 0, got {hard_negative_beta!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_logsumexp(x: Tensor, mask: Tensor) -> Tensor:
    """(m,) logsumexp of x over the True entries of each row. Left-out entries count as a very negative finite
    number, not -inf: exp of it is exactly 0, an empty row's result stays finite, and neither the gradient nor
    the second derivative meets inf - inf (NaN). An empty row gives about finfo.min / 4."""
    filler = torch.full_like(x, torch.finfo(x.dtype).min / 4)
    return torch.logsumexp(torch.where(mask, x, filler), dim=1)


def anchor_loss_sum(anchors: Tensor, anchor_labels: Tensor, anchor_ok: Tensor, anchor_index: Tensor,
                    bank: Tensor, bank_labels: Tensor, bank_ok: Tensor, temperature: float,
                    hard_negative_beta: float, detach_weights: bool = True) -> tuple[Tensor, Tensor]:
    """(sum of l_i over the valid anchors, number of valid anchors), both 0-dim.

    anchors (m, D), anchor_labels / anchor_ok / anchor_index (m,): the anchors, whether each takes part, and
    its own row in the bank (excluded from its positives; -1 = not in the bank). bank (N, D), bank_labels /
    bank_ok (N,): the candidate positives and negatives. Rows are used as given (normalise them first).
    The sum is in the compute dtype (float32, or float64 for float64 inputs); the count is float too.
    """
    dtype = _compute_dtype(anchors.dtype)
    s = anchors.to(dtype) @ bank.to(dtype).T / temperature                         # (m, N)
    same = anchor_labels[:, None] == bank_labels[None, :]
    not_self = torch.arange(bank.shape[0], device=bank.device)[None, :] != anchor_index[:, None]
    take = anchor_ok[:, None] & bank_ok[None, :]
    pos, neg = take & same & not_self, take & ~same
    if hard_negative_beta:
        logits = hard_negative_beta * (s.detach() if detach_weights else s)
        # log w_ik = beta s_ik - log mean_{k' in N(i)} exp(beta s_ik'); |N(i)| >= 1 wherever it is used
        log_mean = _masked_logsumexp(logits, neg) - neg.sum(1).clamp(min=1).to(dtype).log()
        log_w = logits - torch.where(neg.any(1), log_mean, torch.zeros_like(log_mean))[:, None]
        neg_lse = _masked_logsumexp(log_w + s, neg)                              # log sum_k w_ik exp(s_ik)
    else:
        neg_lse = _masked_logsumexp(s, neg)
    # -log(exp(s_ip) / (exp(s_ip) + W_i)) = softplus(log W_i - s_ip), written max(t, 0) + log1p(exp(-|t|)):
    # exact for every t (F.softplus turns linear above 20), exactly 0 for an anchor without negatives, and
    # without an overflowing exp in its derivatives (logaddexp's second derivative overflows there)
    t = neg_lse[:, None] - s
    terms = t.clamp(min=0) + torch.log1p(torch.exp(-t.abs()))
    num_pos = pos.sum(1)
    per_anchor = torch.where(pos, terms, torch.zeros_like(terms)).sum(1) / num_pos.clamp(min=1).to(dtype)
    counted = num_pos > 0
    total = torch.where(counted, per_anchor, torch.zeros_like(per_anchor)).sum()
    return total, counted.sum().to(dtype)


def _taking_part(labels: Tensor, ignore_index: int, valid: Tensor | None) -> Tensor:
    ok = labels != ignore_index
    return ok if valid is None else ok & valid


def label_aware_contrastive_loss(features: Tensor, labels: Tensor, temperature: float = 0.1,
                                 hard_negative_beta: float = 0.0, ignore_index: int = -100,
                                 valid: Tensor | None = None, normalize: bool = True,
                                 detach_weights: bool = True) -> Tensor:
    """L of the module docstring (mean of l_i over the anchors with a positive), a 0-dim tensor.

    features (B, D): the batch's embeddings (any float dtype; L2-normalised here unless normalize=False).
    labels (B,) integer: class of each row; rows equal to ignore_index take no part, nor rows where
    valid (B,) bool is False. Returns 0 (with zero gradients) when no anchor has a positive. The result is
    float32 for half-precision inputs (float64 for float64 ones).
    """
    _check(features, labels, temperature, hard_negative_beta, valid, "label_aware_contrastive_loss")
    x = torch.nn.functional.normalize(features.to(_compute_dtype(features.dtype)), dim=1) if normalize else features
    ok = _taking_part(labels, ignore_index, valid)
    index = torch.arange(labels.shape[0], device=labels.device)
    total, count = anchor_loss_sum(x, labels, ok, index, x, labels, ok, temperature, hard_negative_beta,
                                   detach_weights)
    return total / count.clamp(min=1)


def gathered_label_aware_contrastive_loss(features: Tensor, labels: Tensor, temperature: float = 0.1,
                                          hard_negative_beta: float = 0.0, ignore_index: int = -100,
                                          valid: Tensor | None = None, normalize: bool = True,
                                          detach_weights: bool = True, group=None) -> Tensor:
    """L over the GLOBAL batch (every rank's rows, rank order), the same value on every rank. 0-dim tensor.

    features (n, D), labels (n,), valid (n,): this rank's rows (n equal on every rank, like the sharded
    classifier). Without an initialised process group, or at world size 1, this is label_aware_contrastive_loss.

    Gradients follow the sharded classifier's convention (distributed.collectives): each rank's graph holds
    only its own anchors' terms (against every rank's rows), so that rank r's backward of the replicated
    result gives d(L_r)/d(rows) and the gather's reduce-scatter sums those into dL/d(own rows), exactly
    one process's gradient for these rows; DDP then sums the model gradients over ranks. (Computing the
    whole global loss on every rank would count it world times in that sum.)
    """
    name = "gathered_label_aware_contrastive_loss"
    _check(features, labels, temperature, hard_negative_beta, valid, name)
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return label_aware_contrastive_loss(features, labels, temperature, hard_negative_beta, ignore_index, valid,
                                            normalize, detach_weights)
    # Imported here: oclear_ext.distributed loads the compiled kernels, which the one-process loss never needs.
    from ..distributed.collectives import all_gather_rows, gather_rows_with_grad, sum_replicated_with_grad

    rank = dist.get_rank(group)
    x = torch.nn.functional.normalize(features.to(_compute_dtype(features.dtype)), dim=1) if normalize else features
    ok = _taking_part(labels, ignore_index, valid)
    bank = gather_rows_with_grad(x, group)
    bank_labels = all_gather_rows(labels, group)
    bank_ok = all_gather_rows(ok.to(torch.uint8), group).bool()  # gloo gathers no bool tensors
    n = labels.shape[0]
    index = torch.arange(rank * n, (rank + 1) * n, device=labels.device)
    total, count = anchor_loss_sum(x, labels, ok, index, bank, bank_labels, bank_ok, temperature,
                                   hard_negative_beta, detach_weights)
    count = count.detach().clone().reshape(1)
    dist.all_reduce(count, group=group)  # the global number of anchors, no gradient
    return sum_replicated_with_grad((total / count.clamp(min=1)).reshape(1), group)[0]


class LabelAwareContrastiveLoss(torch.nn.Module):
    """Module form of label_aware_contrastive_loss (gathered=True: over the global batch of all ranks).

    forward(features (B, D), labels (B,), valid (B,) bool | None) -> 0-dim loss.
    """

    def __init__(self, temperature: float = 0.1, hard_negative_beta: float = 0.0, ignore_index: int = -100,
                 normalize: bool = True, detach_weights: bool = True, gathered: bool = False, group=None) -> None:
        super().__init__()
        _check_settings(temperature, hard_negative_beta, "LabelAwareContrastiveLoss")
        self.temperature, self.hard_negative_beta = float(temperature), float(hard_negative_beta)
        self.ignore_index, self.normalize, self.detach_weights = ignore_index, normalize, detach_weights
        self.gathered, self.group = gathered, group

    def forward(self, features: Tensor, labels: Tensor, valid: Tensor | None = None) -> Tensor:
        kw = dict(temperature=self.temperature, hard_negative_beta=self.hard_negative_beta,
                  ignore_index=self.ignore_index, valid=valid, normalize=self.normalize,
                  detach_weights=self.detach_weights)
        if self.gathered:
            return gathered_label_aware_contrastive_loss(features, labels, group=self.group, **kw)
        return label_aware_contrastive_loss(features, labels, **kw)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, hard_negative_beta={self.hard_negative_beta}, "
                f"ignore_index={self.ignore_index}, gathered={self.gathered}")

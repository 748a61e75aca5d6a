"""Plain reference of the label-aware contrastive loss with hard-negative weights (oclear_ext.losses).

Loops over anchors and positives in float64, the formula written out term by term:

    w_ik = exp(beta s_ik) / mean_{k' in N(i)} exp(beta s_ik')          s_ij = z_i . z_j / tau
    l_i  = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip) / (exp(s_ip) + sum_{k in N(i)} w_ik exp(s_ik)) )
    L    = mean of l_i over the anchors with |P(i)| >= 1 (0 when there is none)
"""

from __future__ import annotations

import torch
from torch import Tensor


def label_aware_contrastive_loss(features: Tensor, labels: Tensor, temperature: float = 0.1,
                                 hard_negative_beta: float = 0.0, ignore_index: int = -100,
                                 valid: Tensor | None = None, detach_weights: bool = True) -> Tensor:
    """features (B, D) (normalised here), labels (B,), valid (B,) bool or None -> 0-dim float64 loss."""
    z = torch.nn.functional.normalize(features.double(), dim=1)
    rows = [i for i in range(len(labels)) if int(labels[i]) != ignore_index and (valid is None or bool(valid[i]))]
    per_anchor = []
    for i in rows:
        positives = [p for p in rows if p != i and int(labels[p]) == int(labels[i])]
        negatives = [k for k in rows if int(labels[k]) != int(labels[i])]
        if not positives:
            continue
        s = {j: torch.dot(z[i], z[j]) / temperature for j in positives + negatives}
        negative_sum = z.new_zeros(())
        if negatives:
            raw = {k: torch.exp(hard_negative_beta * (s[k].detach() if detach_weights else s[k])) for k in negatives}
            mean = sum(raw.values()) / len(negatives)
            for k in negatives:
                negative_sum = negative_sum + raw[k] / mean * torch.exp(s[k])
        terms = [-torch.log(torch.exp(s[p]) / (torch.exp(s[p]) + negative_sum)) for p in positives]
        per_anchor.append(sum(terms) / len(positives))
    if not per_anchor:
        return (features.double() * 0).sum()
    return sum(per_anchor) / len(per_anchor)

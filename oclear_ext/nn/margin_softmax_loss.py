"""MarginSoftmaxLoss: a classifier head that owns the class centres and applies the fused loss."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._ops.margin_softmax import MarginSettings, check_reduction, head_loss
from .._ops.negatives import Negatives


class MarginSoftmaxLoss(nn.Module):
    """Margin softmax over `num_classes` learnable class centres (weight (num_classes, embedding_dim)).

    forward(embeddings (N, D), labels (N,)) -> loss, as oclear_ext.margin_softmax_loss with this module's
    weight and settings. The weight is initialised N(0, 0.01) like insightface's Partial FC.

    With `negatives` (RandomNegatives / TopKNegatives) each forward runs over the batch's positives plus the
    sampled negatives, and keeps their sorted ids in `self.active_classes` (for an optimizer that updates
    only those rows). sparse_grad=True then makes weight.grad a sparse tensor of the active rows instead of
    a dense num_classes x D one. class_chunk and check_labels are margin_softmax_loss's (None: the enclosing
    oclear_ext.margin_softmax_options block's); check_labels=False drops the CUDA label check's host sync.
    Under torch.autocast the embeddings run in the autocast dtype and an fp32 weight stays fp32.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        scale: float = 64.0,
        margin: tuple[float, float, float] = (1.0, 0.0, 0.4),
        arcface_grad: str = "exact",
        interclass_filter: float | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        negatives: Negatives | None = None,
        sparse_grad: bool = False,
        class_chunk: int | None = None,
        check_labels: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("embedding_dim", embedding_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MarginSoftmaxLoss: {name} must be a positive int, got {value!r}")
        self.settings = MarginSettings(scale, margin, arcface_grad, interclass_filter, ignore_index, class_chunk,
                                       check_labels)
        check_reduction(reduction)
        self.reduction = reduction
        self.negatives = negatives
        self.sparse_grad = sparse_grad
        self.active_classes: torch.Tensor | None = None
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.01)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        loss, self.active_classes = head_loss(embeddings, self.weight, labels, self.settings, self.reduction,
                                              self.negatives, self.sparse_grad)
        return loss

    def extra_repr(self) -> str:
        s = self.settings
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, scale={s.scale}, "
            f"margin={s.margin}, arcface_grad={s.arcface_grad!r}, interclass_filter={s.interclass_filter}, "
            f"ignore_index={s.ignore_index}, reduction={self.reduction!r}, negatives={self.negatives}"
        )

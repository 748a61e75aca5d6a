"""ShardedMarginClassifier: the class-sharded (model-parallel) margin softmax head for hybrid parallelism."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._ops.margin_softmax import MarginSettings, check_reduction, margin_softmax_loss
from ..distributed.partition import partition
from ..distributed.sharded_softmax import sharded_margin_softmax_loss, world_and_rank


class ShardedMarginClassifier(nn.Module):
    """Holds this rank's shard of the class centres; forward gives the global batch's margin softmax loss.

    `weight` is (len(shard), embedding_dim) with shard = partition(num_classes, world_size)[rank] of the
    process group. forward(local_embeddings (n, D), local_labels (n,)) returns the loss of the global batch
    (mean over the non-ignored rows of all ranks), identical on every rank; every rank must call it with the
    same n. Without torch.distributed, or at world size 1, it is MarginSoftmaxLoss.

    Do not wrap it in DistributedDataParallel: its parameters differ by rank. Put `weight` in its own
    optimizer parameter group. Encoders under DDP: the loss is already the global mean, so their gradients
    must be SUMMED over ranks, not averaged (see oclear_ext.distributed.ddp_sum_gradients).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        process_group=None,
        scale: float = 64.0,
        margin: tuple[float, float, float] = (1.0, 0.0, 0.4),
        arcface_grad: str = "exact",
        interclass_filter: float | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(embedding_dim, int) or isinstance(embedding_dim, bool) or embedding_dim < 1:
            raise ValueError(f"ShardedMarginClassifier: embedding_dim must be a positive int, got {embedding_dim!r}")
        self.settings = MarginSettings(scale, margin, arcface_grad, interclass_filter, ignore_index)
        check_reduction(reduction)
        self.reduction = reduction
        self.process_group = process_group
        self.world_size, self.rank = world_and_rank(process_group)
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.shard = partition(num_classes, self.world_size)[self.rank]
        self.weight = nn.Parameter(torch.empty(len(self.shard), embedding_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.01)

    def forward(self, local_embeddings: Tensor, local_labels: Tensor) -> Tensor:
        s = self.settings
        if self.world_size == 1:
            return margin_softmax_loss(
                local_embeddings, self.weight, local_labels, scale=s.scale, margin=s.margin,
                arcface_grad=s.arcface_grad, interclass_filter=s.interclass_filter,
                ignore_index=s.ignore_index, reduction=self.reduction,
            )
        return sharded_margin_softmax_loss(
            local_embeddings, local_labels, self.weight, self.shard, self.num_classes, s,
            reduction=self.reduction, group=self.process_group,
        )

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
                f"shard=[{self.shard.start}, {self.shard.stop}) of world {self.world_size}, {self.settings}")

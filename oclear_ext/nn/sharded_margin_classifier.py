"""ShardedMarginClassifier: the class-sharded (model-parallel) margin softmax head for hybrid parallelism."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._ops.margin_softmax import MarginSettings, check_reduction, head_loss
from .._ops.negatives import Negatives
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

    Negative sampling (`negatives`) happens per shard, among the shard's own classes: every positive of the
    global batch that the shard holds, plus TopKNegatives(k): the shard's k hardest other classes (so about
    k * world_size in all), or RandomNegatives(rate): rate of the shard's classes (count: per shard). After
    forward, `active_classes` holds this shard's active class ids (global ids, sorted), and with
    sparse_grad=True weight.grad is row-sparse, for oclear_ext.optim's row-sparse optimizers.
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
        negatives: Negatives | None = None,
        sparse_grad: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(embedding_dim, int) or isinstance(embedding_dim, bool) or embedding_dim < 1:
            raise ValueError(f"ShardedMarginClassifier: embedding_dim must be a positive int, got {embedding_dim!r}")
        self.settings = MarginSettings(scale, margin, arcface_grad, interclass_filter, ignore_index)
        check_reduction(reduction)
        self.reduction = reduction
        self.negatives = negatives
        self.sparse_grad = sparse_grad
        self.active_classes: Tensor | None = None
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
            loss, self.active_classes = head_loss(local_embeddings, self.weight, local_labels, s, self.reduction,
                                                  self.negatives, self.sparse_grad)
            return loss
        loss, self.active_classes = sharded_margin_softmax_loss(
            local_embeddings, local_labels, self.weight, self.shard, self.num_classes, s,
            reduction=self.reduction, group=self.process_group, negatives=self.negatives, sparse_grad=self.sparse_grad,
        )
        return loss

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
                f"shard=[{self.shard.start}, {self.shard.stop}) of world {self.world_size}, {self.settings}, "
                f"negatives={self.negatives}")

"""Hybrid parallelism: class-sharded classifier algebra, collectives with autograd, sharded checkpoints."""

from .checkpoint import load_sharded, read_index, save_sharded
from .ddp import ddp_sum_gradients
from .fsdp import fsdp_sum_gradients
from .partition import partition
from .sharded_softmax import RankAgreement, sharded_margin_softmax_loss, world_and_rank

__all__ = ["partition", "sharded_margin_softmax_loss", "world_and_rank", "save_sharded", "load_sharded",
           "read_index", "ddp_sum_gradients", "fsdp_sum_gradients", "RankAgreement"]

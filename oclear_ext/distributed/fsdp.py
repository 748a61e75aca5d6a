"""FSDP2 (torch.distributed.fsdp.fully_shard) for the encoders next to a class-sharded classifier.

Same reason as ddp.py: ShardedMarginClassifier returns the loss of the GLOBAL batch, identical on every
rank, so each rank's backward yields the exact gradient of that one loss with respect to its own samples,
and an encoder's gradient is the SUM of the ranks' gradients. fully_shard's reduce-scatter divides by the
world size by default (the data-parallel mean); this makes it sum:

    encoder = fully_shard(encoder)               # or fully_shard each block, then the root
    fsdp_sum_gradients(encoder)                  # every FSDP module inside: divide factor 1, plain SUM
    classifier = ShardedMarginClassifier(...)    # NOT inside fully_shard: its weight is sharded by class

Divide factor 1 alone makes FSDP2 use ReduceOp.PREMUL_SUM, which gloo does not implement ("Cannot use
ReduceOp.PREMUL_SUM with Gloo"); forcing sum-only reductions uses ReduceOp.SUM, on gloo (CPU) and NCCL alike.
Put the head outside the fully_shard'ed module, or pass its weight in fully_shard(..., ignored_params=...).
"""

from __future__ import annotations

from torch import nn


def fsdp_sum_gradients(module: nn.Module) -> nn.Module:
    """Makes every FSDP2 module in `module` (itself included) reduce-scatter gradients with SUM, not MEAN.

    Returns `module`. Call it after fully_shard, and before the first backward."""
    from torch.distributed.fsdp import FSDPModule

    wrapped = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not wrapped:
        raise TypeError(f"fsdp_sum_gradients: expected a module sharded with torch.distributed.fsdp.fully_shard, "
                        f"found no FSDP module in {type(module).__name__}")
    for m in wrapped:
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    return module

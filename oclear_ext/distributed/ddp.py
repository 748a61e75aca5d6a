"""DDP for the encoders next to a class-sharded classifier.

ShardedMarginClassifier returns the loss of the GLOBAL batch, the same on every rank, and each rank's
backward yields the exact gradient of that loss with respect to its own samples. The encoder's total
gradient is therefore the SUM of the ranks' gradients. DDP's default all-reduce AVERAGES them, which
would scale the encoders' gradient by 1 / world_size relative to the classifier's (a hidden coupling
that some implementations patch by multiplying the loss by the world size). Registering this hook
makes DDP sum, so every parameter gets the gradient of the one global loss.
"""

# No `from __future__ import annotations` here: DDP checks the hook's annotations by identity
# (dist.GradBucket, torch.futures.Future[torch.Tensor]), which postponed (string) annotations fail.
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def _sum_hook(process_group, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def ddp_sum_gradients(model: DistributedDataParallel, process_group=None) -> DistributedDataParallel:
    """Makes `model` all-reduce gradients with SUM instead of MEAN (see the module docstring); returns it."""
    if not isinstance(model, DistributedDataParallel):
        raise TypeError(f"ddp_sum_gradients: expected a DistributedDataParallel module, got {type(model).__name__}")
    model.register_comm_hook(process_group, _sum_hook)
    return model

"""Contiguous class shards for the class-sharded (model-parallel) classifier."""

from __future__ import annotations


def partition(num_classes: int, world_size: int) -> list[range]:
    """Splits classes [0, num_classes) into `world_size` contiguous shards whose sizes differ by at most 1.

    The first `num_classes % world_size` shards get one class more. Every class is in exactly one shard.
    Each shard must hold at least one class (an empty shard has no softmax statistics to contribute).
    """
    for name, value in (("num_classes", num_classes), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"partition: {name} must be a positive int, got {value!r}")
    if world_size > num_classes:
        raise ValueError(
            f"partition: {num_classes} classes cannot fill {world_size} shards (every shard needs at least one class)"
        )
    base, extra = divmod(num_classes, world_size)
    shards, start = [], 0
    for rank in range(world_size):
        size = base + (1 if rank < extra else 0)
        shards.append(range(start, start + size))
        start += size
    return shards

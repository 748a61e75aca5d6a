"""Contiguous class shards for the class-sharded (model-parallel) classifier: DTensor's Shard(0) layout."""

from __future__ import annotations


def partition(num_classes: int, world_size: int) -> list[range]:
    """Splits classes [0, num_classes) into `world_size` contiguous shards, exactly as DTensor's Shard(0) does.

    The layout is torch.chunk's, which DTensor (and so state_dict() resharding and torch.distributed.checkpoint)
    assumes for a tensor sharded on dim 0: every shard holds ceil(num_classes / world_size) classes except the
    last non-empty one, which holds the rest; trailing shards may be empty (e.g. 9 classes over 4 ranks:
    3, 3, 3, 0). A rank with an empty shard still takes part in every collective (its shard contributes
    exp(-inf) = 0 to the softmax sums). Shards differ from a balanced split by less than world_size classes,
    nothing at real class counts. Every class is in exactly one shard.
    """
    for name, value in (("num_classes", num_classes), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"partition: {name} must be a positive int, got {value!r}")
    chunk = -(-num_classes // world_size)  # ceil
    return [range(min(rank * chunk, num_classes), min((rank + 1) * chunk, num_classes)) for rank in range(world_size)]

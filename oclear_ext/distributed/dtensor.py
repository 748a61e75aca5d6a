"""Row-sharded tensors as DTensors: Shard(0) over a 1-D DeviceMesh of one process group.

The class-sharded classifier keeps its weight as such a DTensor so that state_dict(), torch.distributed.checkpoint
and FSDP2-style tooling see one (num_classes, D) tensor with a known layout (partition(), which is DTensor's
Shard(0) layout), while the kernels work on the plain local shard (`local_rows`). No function here communicates.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def class_mesh(group, device_type: str):
    """A 1-D DeviceMesh over the ranks of `group` (None: the default group), for tensors on `device_type`."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group if group is not None else dist.group.WORLD, device_type)


def rows_as_dtensor(local: Tensor, mesh, num_rows: int) -> Tensor:
    """The (num_rows, ...) DTensor, Shard(0) over `mesh`, whose shard on this rank is `local` (same storage).

    `local` must hold exactly this rank's rows of partition(num_rows, mesh.size()); the caller guarantees it
    (no collective checks it).
    """
    from torch.distributed.tensor import DTensor, Shard

    shape = (num_rows, *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()  # a contiguous global tensor's strides
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride)


def is_dtensor(t) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_rows(t: Tensor) -> Tensor:
    """This rank's rows of a Shard(0) DTensor as a plain tensor (sharing its storage); a plain tensor as is."""
    return t.to_local() if is_dtensor(t) else t


def like_rows_of(local: Tensor, param: Tensor) -> Tensor:
    """`local` (this rank's rows) in the form of `param`: a DTensor with param's mesh and global row count when
    param is one, else `local` itself. For optimizer state restored from per-rank rows: torch's optimizers
    cannot mix a plain state tensor with a DTensor parameter."""
    if not is_dtensor(param):
        return local
    return rows_as_dtensor(local.to(param.to_local().device), param.device_mesh, param.shape[0])

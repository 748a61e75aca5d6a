"""ShardedMarginClassifier: the class-sharded (model-parallel) margin softmax head for hybrid parallelism."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._ops.margin_softmax import MarginSettings, check_reduction, head_loss
from .._ops.negatives import Negatives
from ..distributed.dtensor import class_mesh, is_dtensor, local_rows, rows_as_dtensor
from ..distributed.partition import partition
from ..distributed.sharded_softmax import RankAgreement, sharded_margin_softmax_loss, world_and_rank

_NAME = "ShardedMarginClassifier"
CHECK_RANKS = ("once", "always")


class ShardedMarginClassifier(nn.Module):
    """The class centres split over the ranks of a process group; forward gives the global batch's margin softmax loss.

    Where it runs. Built after torch.distributed.init_process_group, it shards over `process_group` (default:
    the default group) or over the ranks of a 1-D `device_mesh`, and every rank of that group must build it and
    call forward and backward together. Without torch.distributed it is MarginSoftmaxLoss (one process, every
    class). The world size and rank are read once, here, and forward refuses to run in another. Building it
    before init_process_group when a distributed run is expected raises instead of silently giving every rank
    its own full head; "expected" means: `process_group` / `device_mesh` passed, `world_size` passed and not
    equal to the group's (e.g. world_size=4 while torch.distributed is not initialised), or WORLD_SIZE > 1 in
    the environment (set by torchrun). world_size=1 opts out of that last signal, for a deliberately unsharded
    head under torchrun.

    The weight. `weight` is the (num_classes, embedding_dim) parameter, initialised N(0, 0.01) shard by shard
    from each rank's own RNG. In a process group it is a DTensor, Shard(0) over a 1-D DeviceMesh of the group,
    with DTensor's chunk layout: rank r holds rows partition(num_classes, world_size)[r] (= `shard`), ceil(C / P)
    rows each, the last ones fewer or none. So state_dict() holds one (C, D) tensor that
    torch.distributed.checkpoint saves and loads at any world size; load_state_dict also takes a plain (C, D)
    tensor (e.g. MarginSoftmaxLoss's), keeping this rank's rows. Without torch.distributed it is a plain tensor.
    `local_weight` is this rank's (len(shard), D) rows as a plain tensor sharing the DTensor's storage.

    Gradients and optimizers. forward runs the kernels on weight.to_local(), so weight.grad is a DTensor of
    the same layout, and torch.optim's optimizers step on the DTensor directly. Exception: sparse_grad=True
    with `negatives` in a process group. A DTensor has no sparse layout, so the row-sparse gradient lands on
    `local_weight` instead (weight.grad stays None), and the row-sparse optimizers (oclear_ext.optim) step on
    that plain tensor; sharing storage, the DTensor (and state_dict, DCP) sees every update. `trainable_weight`
    names the one to give the optimizer in every case (weight, or local_weight). Freeze the head with
    weight.requires_grad_(False) in every case. Keep it in its own optimizer parameter group (a DTensor and
    plain tensors cannot share a foreach group), and move the module before building the optimizer, as for
    any module.

    Do not wrap it in DistributedDataParallel or fully_shard (its weight is already sharded, by class).
    Encoders under DDP or FSDP2: the loss is already the global mean, so their gradients must be SUMMED over
    ranks, not averaged (oclear_ext.distributed.ddp_sum_gradients / fsdp_sum_gradients).

    forward(local_embeddings (n, D), local_labels (n,)) -> "mean" / "sum": the loss of the global batch (mean
    over the non-ignored rows of all ranks), identical on every rank; "none": (n,) the loss of each of THIS
    rank's rows, whose backward is exact for any function each rank takes of its rows (the objective is the
    sum over ranks). Every rank must call it with the same n and settings: the ranks check that they agree
    (all-gather) once per distinct configuration (check_ranks="once", see RankAgreement for what that cannot
    see) or on every call (check_ranks="always", for debugging); a disagreement raises on every rank.

    Negative sampling (`negatives`) happens per shard, among the shard's own classes: every positive of the
    global batch that the shard holds, plus TopKNegatives(k): the shard's k hardest other classes (so about
    k * world_size in all; all of them on a shard with fewer), or RandomNegatives(rate): rate of the shard's
    classes (count: per shard). After forward, `active_classes` holds this shard's active class ids (global
    ids, sorted), and with sparse_grad=True the gradient is row-sparse, for oclear_ext.optim's row-sparse
    optimizers. class_chunk and check_labels are MarginSoftmaxLoss's (None: the enclosing
    oclear_ext.margin_softmax_options block's).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        process_group=None,
        device_mesh=None,
        world_size: int | None = None,
        check_ranks: str = "once",
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
                raise ValueError(f"{_NAME}: {name} must be a positive int, got {value!r}")
        if check_ranks not in CHECK_RANKS:
            raise ValueError(f"{_NAME}: check_ranks must be one of {CHECK_RANKS}, got {check_ranks!r}")
        self.settings = MarginSettings(scale, margin, arcface_grad, interclass_filter, ignore_index, class_chunk,
                                       check_labels)
        check_reduction(reduction)
        self.reduction = reduction
        self.negatives = negatives
        self.sparse_grad = sparse_grad
        self.active_classes: Tensor | None = None
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.process_group = _resolve_group(process_group, device_mesh)
        self.world_size, self.rank = _construction_world(self.process_group, world_size)
        self.distributed = dist.is_available() and dist.is_initialized()  # weight is a DTensor
        self.shard = partition(num_classes, self.world_size)[self.rank]
        self._agreement = RankAgreement(always=check_ranks == "always")
        local = torch.empty(len(self.shard), embedding_dim, device=device, dtype=dtype)
        if self.distributed:
            mesh = device_mesh if device_mesh is not None else class_mesh(self.process_group, local.device.type)
            self.weight = nn.Parameter(rows_as_dtensor(local, mesh, num_classes))
        else:
            self.weight = nn.Parameter(local)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # On the local rows: each rank draws its own shard from its own RNG, and no collective runs.
        nn.init.normal_(local_rows(self.weight.detach()), mean=0.0, std=0.01)

    @property
    def local_weight(self) -> Tensor:
        """This rank's rows of `weight`, (len(shard), D), as a plain leaf tensor sharing its storage (`weight`
        itself without torch.distributed). With sparse_grad=True and negatives in a process group, forward's
        row-sparse gradient lands here."""
        if not self.distributed:
            return self.weight
        with torch.no_grad():
            current = self.weight.to_local()
        alias = self.__dict__.get("_local_weight")  # kept out of _parameters: not a second entry of state_dict
        if alias is None:
            alias = self.__dict__["_local_weight"] = nn.Parameter(current, requires_grad=True)
        elif alias.data_ptr() != current.data_ptr() or alias.shape != current.shape or alias.device != current.device:
            alias.data = current  # weight was moved or replaced: the same tensor object follows it
        return alias

    @property
    def trainable_weight(self) -> Tensor:
        """The tensor whose .grad forward fills and that the optimizer must step on: `weight`, or `local_weight`
        when sparse_grad=True with negatives in a process group (a DTensor cannot hold a row-sparse gradient)."""
        return self.local_weight if self._grad_on_local_rows() else self.weight

    def _grad_on_local_rows(self) -> bool:
        return self.distributed and self.sparse_grad and self.negatives is not None

    def forward(self, local_embeddings: Tensor, local_labels: Tensor) -> Tensor:
        self._check_same_world()
        weight = self._forward_weight()
        s = self.settings
        if self.world_size == 1:
            loss, self.active_classes = head_loss(local_embeddings, weight, local_labels, s, self.reduction,
                                                  self.negatives, self.sparse_grad)
            return loss
        loss, self.active_classes = sharded_margin_softmax_loss(
            local_embeddings, local_labels, weight, self.shard, self.num_classes, s,
            reduction=self.reduction, group=self.process_group, negatives=self.negatives, sparse_grad=self.sparse_grad,
            agreement=self._agreement,
        )
        return loss

    def _forward_weight(self) -> Tensor:
        """The plain (len(shard), D) tensor the kernels get, wired so that the gradient reaches trainable_weight."""
        if not self.distributed:
            return self.weight
        if self._grad_on_local_rows():
            local = self.local_weight
            return local if self.weight.requires_grad else local.detach()
        return self.weight.to_local()  # differentiable: weight.grad becomes a Shard(0) DTensor

    def _check_same_world(self) -> None:
        world, rank = world_and_rank(self.process_group)
        if (world, rank) != (self.world_size, self.rank):
            when = "" if self.distributed else " (torch.distributed was not initialised then)"
            raise RuntimeError(
                f"{_NAME}: built for world size {self.world_size}, rank {self.rank}{when}, but forward runs at "
                f"world size {world}, rank {rank}; build the classifier after init_process_group, in the process "
                "group it runs in")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A plain (C, D) weight (a single-process checkpoint, MarginSoftmaxLoss's) loads into the DTensor as
        # this rank's rows; a DTensor of the same layout loads as usual.
        key = prefix + "weight"
        value = state_dict.get(key)
        if (self.distributed and isinstance(value, Tensor) and not is_dtensor(value)
                and tuple(value.shape) == tuple(self.weight.shape)):
            local = self.weight.to_local()
            rows = value[self.shard.start : self.shard.stop].to(device=local.device, dtype=local.dtype)
            state_dict = {**state_dict, key: rows_as_dtensor(rows, self.weight.device_mesh, self.num_classes)}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        layout = "DTensor Shard(0)" if self.distributed else "tensor"
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
                f"shard=[{self.shard.start}, {self.shard.stop}) of world {self.world_size} ({layout}), "
                f"{self.settings}, reduction={self.reduction!r}, negatives={self.negatives}")


def _resolve_group(process_group, device_mesh):
    """The process group to shard over (None: the default group), from `process_group` and/or a 1-D `device_mesh`."""
    if (process_group is not None or device_mesh is not None) and not (dist.is_available() and dist.is_initialized()):
        passed = "process_group" if process_group is not None else "device_mesh"
        raise RuntimeError(f"{_NAME}: {passed} was passed but torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group before building the classifier")
    if device_mesh is None:
        return process_group
    if device_mesh.ndim != 1:
        raise ValueError(f"{_NAME}: device_mesh must be 1-D (the ranks the classes are split over), got "
                         f"{device_mesh.ndim}-D with shape {tuple(device_mesh.shape)}; pass mesh[<dim name>]")
    group = device_mesh.get_group()
    if process_group is not None and dist.get_process_group_ranks(process_group) != dist.get_process_group_ranks(group):
        raise ValueError(f"{_NAME}: process_group (ranks {dist.get_process_group_ranks(process_group)}) and "
                         f"device_mesh (ranks {dist.get_process_group_ranks(group)}) differ; pass one of them")
    return group


def _construction_world(group, expected: int | None) -> tuple[int, int]:
    """(world size, rank) of `group`, refusing a world other than the one the caller or torchrun expects."""
    if expected is not None and (not isinstance(expected, int) or isinstance(expected, bool) or expected < 1):
        raise ValueError(f"{_NAME}: world_size must be a positive int or None, got {expected!r}")
    world, rank = world_and_rank(group)
    if rank < 0:
        raise ValueError(f"{_NAME}: this process (global rank {dist.get_rank()}) is not a member of process_group")
    initialised = dist.is_available() and dist.is_initialized()
    hint = "" if initialised else (" (torch.distributed is not initialised: call torch.distributed."
                                   "init_process_group before building the classifier)")
    if expected is not None and expected != world:
        raise ValueError(f"{_NAME}: world_size={expected} was expected, but the process group has {world} "
                         f"rank(s){hint}")
    launched = os.environ.get("WORLD_SIZE", "1")
    if expected is None and not initialised and launched.isdigit() and int(launched) > 1:
        raise RuntimeError(f"{_NAME}: the environment says WORLD_SIZE={launched} (a torchrun launch), but "
                           "torch.distributed is not initialised, so every process would train its own full head; "
                           "call torch.distributed.init_process_group before building the classifier (or pass "
                           "world_size=1 for one unsharded head per process)")
    return world, rank

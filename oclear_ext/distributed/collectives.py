"""Collectives with the autograd rules the sharded softmax needs.

Every rank computes the same global loss L (replicated after the all-reduces), and each rank's graph
holds only the path through its own class shard. Hence:
- all_gather of the embeddings: rank r's backward holds dL/dX restricted to shard r's contribution;
  the true dL/dX is the SUM over ranks, and each rank needs only its own rows -> reduce-scatter (sum).
- all_reduce(SUM) of the per-shard statistics: d(sum)/d(input_r) = 1, and the upstream gradient is
  already identical on every rank (same L, same replicated graph downstream) -> identity, no traffic.
  (The textbook rule "backward of all_reduce is all_reduce" would count every rank's replica of L and
  multiply the gradient by the world size.)
- taking this rank's rows of such a replicated (P n,) tensor (reduction="none"): each rank then
  backpropagates its own function of its own rows, so the objective is the sum over ranks of those, and
  its gradient with respect to the replicated tensor is the concatenation of every rank's gradient of its
  rows -> all-gather. That makes the upstream gradient identical on every rank again, as the rule above needs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


# torch 2.13 renamed the tensor collectives (*_into_tensor / *_tensor -> *_single); older torch has only
# the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _world(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def all_gather_rows(local: Tensor, group=None) -> Tensor:
    """Concatenation over ranks (rank order) of equally sized (n, ...) tensors; no autograd."""
    world, _ = _world(group)
    out = local.new_empty((world * local.shape[0], *local.shape[1:]))
    _all_gather(out, local.contiguous(), group=group)
    return out


def reduce_scatter_rows(full: Tensor, group=None) -> Tensor:
    """Sum over ranks of (world * n, ...) tensors, returning this rank's (n, ...) block; no autograd."""
    world, rank = _world(group)
    n = full.shape[0] // world
    if dist.get_backend(group) == dist.Backend.GLOO:  # gloo has no reduce_scatter
        summed = full.contiguous().clone()
        dist.all_reduce(summed, group=group)
        return summed[rank * n : (rank + 1) * n].clone()
    out = full.new_empty((n, *full.shape[1:]))
    _reduce_scatter(out, full.contiguous(), group=group)
    return out


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: Tensor, group) -> Tensor:
        ctx.group = group
        return all_gather_rows(local, group)

    @staticmethod
    def backward(ctx, grad_full: Tensor):
        return reduce_scatter_rows(grad_full, ctx.group), None


class _SumReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: Tensor, group) -> Tensor:
        out = local.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _OwnRowsOfReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, full: Tensor, group) -> Tensor:
        world, rank = _world(group)
        n = full.shape[0] // world
        ctx.group = group
        return full[rank * n : (rank + 1) * n].clone()

    @staticmethod
    def backward(ctx, grad_own: Tensor):
        return all_gather_rows(grad_own, ctx.group), None


def gather_rows_with_grad(local: Tensor, group=None) -> Tensor:
    """all_gather whose backward reduce-scatters the gradient (see the module docstring)."""
    return _GatherRows.apply(local, group)


def sum_replicated_with_grad(local: Tensor, group=None) -> Tensor:
    """all_reduce(SUM) feeding a loss replicated on every rank: its backward is the identity."""
    return _SumReplicated.apply(local, group)


def own_rows_of_replicated(full: Tensor, group=None) -> Tensor:
    """This rank's block (n, ...) of a (world * n, ...) tensor replicated on every rank; its backward
    all-gathers the ranks' gradients (see the module docstring). Collective in the backward."""
    return _OwnRowsOfReplicated.apply(full, group)


def all_reduce_max(t: Tensor, group=None) -> Tensor:
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out

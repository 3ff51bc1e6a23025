"""Collectives with the gradient semantics contrastive losses need.

``all_gather_with_grad`` concatenates every rank's tensor along dim 0 and, in backward, sends
each rank the SUM over ranks of the gradient of its own slice (each rank's loss used every slice).
That is what makes gathered losses equal the single-process global-batch loss once gradients are
averaged across ranks. On NCCL the backward is one reduce-scatter; other backends (gloo) have no
reduce-scatter, so they all-reduce the whole gradient and keep their own slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _gather_into(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.rows = x.shape[0]
        return _gather_into(x, group)

    @staticmethod
    def backward(ctx, grad):
        group, rows = ctx.group, ctx.rows
        grad = grad.contiguous()
        if dist.get_backend(group) == dist.Backend.NCCL:
            out = grad.new_empty((rows,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=group)
            return out, None
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
        rank = dist.get_rank(group)
        return grad[rank * rows : (rank + 1) * rows].clone(), None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``x`` from every rank (same shape on all ranks); gradients flow to the owners."""
    return _AllGatherWithGrad.apply(x, group)


def all_gather_no_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``x`` from every rank; the result is detached."""
    with torch.no_grad():
        return _gather_into(x.detach(), group)

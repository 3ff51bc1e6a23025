"""Batch norm over the global batch for the SimSiam heads, on any backend.

Per-rank batch statistics make N ranks train a different model than one process over the same
global batch (and are noisy at small per-rank batches). ``nn.SyncBatchNorm`` fixes that on GPUs
only; :class:`GlobalBatchNorm1d` does it for [B, C] features with one differentiable all-reduce
of (sum, sum of squares, count) per call, so it also runs on gloo (CPU tests, the CPU demo under
torchrun). The gradient of the all-reduce is the all-reduce of the gradients, which is exact for
the sum of the ranks' losses. :func:`convert` swaps it in for every ``BatchNorm1d`` of a module
(parameters and running statistics carried over); the trainer calls it when world size > 1.
"""

from __future__ import annotations

import torch
from torch import nn

from declip_fast.distributed import env


class GlobalBatchNorm1d(nn.BatchNorm1d):
    group = None  # process group; None: the default one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and env.world_size(self.group) > 1):
            return super().forward(x)
        if x.dim() != 2:
            raise ValueError(f"GlobalBatchNorm1d takes [B, C] features, got {tuple(x.shape)}")
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        x32 = x.float()
        count = torch.full((1,), float(x.shape[0]), device=x.device)
        stats = all_reduce(torch.cat([x32.sum(0), (x32 * x32).sum(0), count]), group=self.group)
        total = stats[2 * c]
        mean = stats[:c] / total
        var = (stats[c : 2 * c] / total - mean * mean).clamp(min=0)  # biased, as BN normalises
        y = (x32 - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * total / (total - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        return y.to(x.dtype)


def convert(module: nn.Module, group=None) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` in ``module`` (in place) by a GlobalBatchNorm1d."""
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm1d:
            new = GlobalBatchNorm1d(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
                device=_device(child),
            )
            new.group = group
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert(child, group)
    return module


def _device(module: nn.Module):
    tensors = list(module.parameters()) + list(module.buffers())
    return tensors[0].device if tensors else None

"""Optimizer, learning-rate schedule and the logit-scale clamp: what the paper recipes in
``configs/`` use (README, "Train").

- Parameter groups: weight decay on matrices and convolution kernels only; none on norms,
  biases, embeddings' positional tables, class tokens and ``logit_scale`` (every parameter with
  fewer than 2 dimensions, plus the names in ``NO_DECAY_NAMES``).
- ``adamw``: ``torch.optim.AdamW`` with ``fused=True`` where the parameters' device supports it
  (CUDA; the CPU has a fused kernel too in recent torch) else ``foreach``.
- ``lamb``: for very large global batches. apex's ``FusedLAMB`` when apex imports (it is not on
  PyPI), else :class:`Lamb`, written here on ``torch._foreach`` ops (You et al. 2020: Adam's
  update with decoupled weight decay, scaled per tensor by ||w|| / ||update||).
- Schedule: linear warm-up from ``warmup_start`` x lr to lr over ``warmup_steps``, then cosine to
  ``final_lr_ratio`` x lr at ``decay_steps`` (None: the run's steps); constant after.
- ``clamp_logit_scale``: keeps ``logit_scale`` in [ln 20, ln 100] after each step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)
NO_DECAY_NAMES = ("logit_scale", "positional_embedding", "class_embedding", "cls_token")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | lamb
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 2500
    warmup_start: float = 0.1  # warm-up starts at this fraction of lr (1e-4 -> 1e-3 in the paper)
    decay_steps: int | None = None  # cosine reaches final_lr_ratio here; None: the run's steps
    final_lr_ratio: float = 0.0
    grad_clip: float | None = None  # max global grad norm; None: no clipping (the paper's)
    logit_scale_min: float = math.log(20.0)
    logit_scale_max: float = math.log(100.0)

    def __post_init__(self):
        from declip_fast.train.validate import check_number

        if self.name not in ("adamw", "lamb"):
            raise ValueError(f"optim.name must be adamw or lamb, got {self.name!r}")
        check_number("optim.lr", self.lr, low=0, low_open=True)
        check_number("optim.eps", self.eps, low=0, low_open=True)
        check_number("optim.weight_decay", self.weight_decay, low=0)
        check_number("optim.warmup_steps", self.warmup_steps, low=0)
        check_number("optim.warmup_start", self.warmup_start, low=0, high=1)
        check_number("optim.final_lr_ratio", self.final_lr_ratio, low=0)
        if self.decay_steps is not None:
            check_number("optim.decay_steps", self.decay_steps, low=1)
        if self.grad_clip is not None:
            check_number("optim.grad_clip", self.grad_clip, low=0, low_open=True)
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise ValueError(f"optim.betas must be two numbers [beta1, beta2], got {self.betas!r}")
        for i, beta in enumerate(self.betas):
            check_number(f"optim.betas[{i}]", beta, low=0, high=1, high_open=True)
        check_number("optim.logit_scale_min", self.logit_scale_min)
        check_number("optim.logit_scale_max", self.logit_scale_max)
        if self.logit_scale_min > self.logit_scale_max:
            raise ValueError(
                f"optim.logit_scale_min {self.logit_scale_min} is above optim.logit_scale_max {self.logit_scale_max}"
            )
        self.betas = tuple(float(b) for b in self.betas)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or any(n in name for n in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, config.weight_decay)
    if config.name == "lamb":
        try:
            from apex.optimizers import FusedLAMB  # not on PyPI: only where apex was built
        except Exception:  # ImportError, or a broken apex build
            return Lamb(groups, lr=config.lr, betas=config.betas, eps=config.eps)
        return FusedLAMB(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    try:
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=True)
    except (RuntimeError, ValueError) as err:  # a device or dtype the fused kernel does not take
        log.info("fused AdamW unavailable (%s): using foreach", err)
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, foreach=True)


class Lamb(torch.optim.Optimizer):
    """LAMB on ``torch._foreach`` ops: per tensor, update = Adam direction + weight_decay * w, then
    w -= lr * trust * update with trust = ||w|| / ||update|| (1 where either norm is 0)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            grads, exp_avg, exp_sq = [], [], []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                grads.append(p.grad)
                exp_avg.append(state["exp_avg"])
                exp_sq.append(state["exp_avg_sq"])
            step = self.state[params[0]]["step"]
            torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
            torch._foreach_mul_(exp_sq, beta2)
            torch._foreach_addcmul_(exp_sq, grads, grads, value=1 - beta2)
            bias1, bias2 = 1 - beta1**step, 1 - beta2**step
            denom = torch._foreach_sqrt(exp_sq)
            torch._foreach_div_(denom, math.sqrt(bias2))
            torch._foreach_add_(denom, group["eps"])
            update = torch._foreach_div(exp_avg, denom)
            torch._foreach_div_(update, bias1)
            if group["weight_decay"]:
                torch._foreach_add_(update, params, alpha=group["weight_decay"])
            w_norm = torch._foreach_norm(params)
            u_norm = torch._foreach_norm(update)
            trust = [torch.where((w > 0) & (u > 0), w / u, torch.ones_like(w)) for w, u in zip(w_norm, u_norm)]
            torch._foreach_mul_(update, trust)
            torch._foreach_add_(params, update, alpha=-group["lr"])
        return loss


def lr_lambda(config: OptimConfig, total_steps: int):
    """Multiplier of the base lr at step ``s`` (0-based: the lr used by the s-th update)."""
    decay_end = config.decay_steps or total_steps
    warm = config.warmup_steps

    def factor(step: int) -> float:
        if step < warm:
            return config.warmup_start + (1.0 - config.warmup_start) * step / warm
        if step >= decay_end:
            return config.final_lr_ratio
        progress = (step - warm) / max(1, decay_end - warm)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return config.final_lr_ratio + (1.0 - config.final_lr_ratio) * cosine

    return factor


def build_scheduler(optimizer, config: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))


@torch.no_grad()
def clamp_logit_scale(model: nn.Module, config: OptimConfig) -> None:
    """Keep the (log) logit scale in [logit_scale_min, logit_scale_max] (sharded or not)."""
    for name, p in model.named_parameters():
        if name.endswith("logit_scale"):
            p.clamp_(config.logit_scale_min, config.logit_scale_max)

"""Parameter groups, the LR schedule, LAMB and the logit-scale clamp against hand-written math."""

import math

import pytest
import torch

from declip_fast.models import presets
from declip_fast.train import optim as O


def test_no_weight_decay_on_norms_biases_embedding_tables_and_logit_scale():
    model = presets.build("declip_tiny")
    decay, no_decay = O.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "logit_scale" in kept and "text.positional_embedding" in kept
    assert all(p.dim() >= 2 for p in decay["params"])
    assert not any(n.endswith(".bias") or ".ln" in n or ".bn" in n for n in decayed)
    assert "text.token_embedding.weight" in decayed and len(decayed) + len(kept) == len(names)


def test_schedule_warms_up_linearly_then_follows_a_cosine():
    cfg = O.OptimConfig(lr=1e-3, warmup_steps=10, warmup_start=0.1, decay_steps=110, final_lr_ratio=0.0)
    f = O.lr_lambda(cfg, total_steps=999)
    assert f(0) == pytest.approx(0.1) and f(5) == pytest.approx(0.55) and f(10) == pytest.approx(1.0)
    for step in (10, 35, 60, 85, 109):
        assert f(step) == pytest.approx(0.5 * (1 + math.cos(math.pi * (step - 10) / 100)))
    assert f(110) == 0.0 and f(500) == 0.0
    # decay_steps None: the run's length
    assert O.lr_lambda(O.OptimConfig(warmup_steps=0), total_steps=50)(25) == pytest.approx(0.5)


def _lamb64(p, grads, lr, betas, eps, wd):
    """LAMB (You et al. 2020, Algorithm 2 with bias correction), float64, one tensor."""
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        r = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps) + wd * p
        trust = p.norm() / r.norm() if p.norm() > 0 and r.norm() > 0 else 1.0
        p = p - lr * trust * r
    return p


def test_lamb_matches_the_paper_update(rng):
    w = torch.randn(5, 7, generator=rng, dtype=torch.float64)
    grads = [torch.randn(5, 7, generator=rng, dtype=torch.float64) for _ in range(3)]
    param = torch.nn.Parameter(w.clone())
    opt = O.Lamb([param], lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    torch.testing.assert_close(param.detach(), _lamb64(w, grads, 0.01, (0.9, 0.99), 1e-6, 0.05))


def test_optimizer_choice_and_clamp():
    model = presets.build("clip_tiny")
    assert isinstance(O.build_optimizer(model, O.OptimConfig()), torch.optim.AdamW)
    assert isinstance(O.build_optimizer(model, O.OptimConfig(name="lamb")), (O.Lamb, torch.optim.Optimizer))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    O.clamp_logit_scale(model, O.OptimConfig())
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        model.logit_scale.fill_(0.0)
    O.clamp_logit_scale(model, O.OptimConfig())
    assert model.logit_scale.item() == pytest.approx(math.log(20))
    with pytest.raises(ValueError, match="optim.name"):
        O.OptimConfig(name="sgd")

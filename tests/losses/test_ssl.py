"""SimSiam and MLM losses against short float64 references, and where their gradients go."""

import pytest
import torch

from declip_fast.losses.ssl import MLMLoss, SimSiamLoss


def _simsiam64(p1, p2, z1, z2):
    cos = lambda p, z: ((p / p.norm(dim=1, keepdim=True)) * (z / z.norm(dim=1, keepdim=True))).sum(1).mean()
    return -0.5 * (cos(p1, z2) + cos(p2, z1))


def test_simsiam_value_and_stop_gradient(rng):
    p1, p2, z1, z2 = (torch.randn(9, 17, generator=rng, dtype=torch.float64, requires_grad=True) for _ in range(4))
    loss = SimSiamLoss()(p1, p2, z1, z2)
    exact = _simsiam64(p1, p2, z1.detach(), z2.detach())
    assert abs(loss.item() - exact.item()) < 1e-6  # fp32 cosine
    (loss * 1.3).backward()
    assert z1.grad is None and z2.grad is None, "gradient leaked through the stop-gradient"
    gp1, gp2 = torch.autograd.grad(exact * 1.3, (p1, p2))
    assert torch.allclose(p1.grad, gp1, atol=1e-6) and torch.allclose(p2.grad, gp2, atol=1e-6)


def test_simsiam_is_minus_one_for_aligned_views(rng):
    z = torch.randn(4, 8, generator=rng)
    assert abs(SimSiamLoss()(2 * z, 3 * z, z, z).item() + 1) < 1e-6


def test_mlm_counts_only_masked_positions(rng):
    logits = torch.randn(3, 7, 11, generator=rng, dtype=torch.float64, requires_grad=True)
    targets = torch.full((3, 7), -100)
    targets[0, 2], targets[1, 5], targets[2, 1] = 4, 0, 10
    loss = MLMLoss()(logits, targets)
    picked = [(0, 2, 4), (1, 5, 0), (2, 1, 10)]
    exact = sum(torch.logsumexp(logits[b, l], 0) - logits[b, l, t] for b, l, t in picked) / 3
    assert abs(loss.item() - exact.item()) < 1e-5
    loss.backward()
    touched = logits.grad.abs().sum(-1) > 0
    assert touched.sum() == 3 and all(touched[b, l] for b, l, _ in picked)


def test_mlm_on_gathered_positions_and_nothing_masked(rng):
    logits = torch.randn(5, 11, generator=rng, requires_grad=True)
    targets = torch.tensor([1, 2, 3, 4, 5])
    exact = torch.nn.functional.cross_entropy(logits.double(), targets)
    assert abs(MLMLoss()(logits, targets).item() - exact.item()) < 1e-5
    none = MLMLoss()(logits, torch.full((5,), -100))
    assert none.item() == 0.0 and none.requires_grad


def test_shape_errors():
    with pytest.raises(ValueError, match="shape"):
        SimSiamLoss()(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="targets"):
        MLMLoss()(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))

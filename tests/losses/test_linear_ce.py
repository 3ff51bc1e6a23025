"""linear_cross_entropy (declip_fast.kernels' functional API; its torch implementation is
kernels/linear_ce.py) against PyTorch's F.cross_entropy(F.linear(...)) in float64, and the MLM
head's fused loss against its logits path."""

import pytest
import torch
import torch.nn.functional as F

from declip_fast.kernels import linear_cross_entropy
from declip_fast.models import presets


def _inputs(rng, k, v, d, dtype=torch.float32, bias=True, ignored=0.3):
    x = torch.randn(k, d, generator=rng, dtype=dtype)
    w = torch.randn(v, d, generator=rng, dtype=dtype) * 0.5
    b = torch.randn(v, generator=rng, dtype=dtype) if bias else None
    t = torch.randint(0, v, (k,), generator=rng)
    t[torch.rand(k, generator=rng) < ignored] = -100
    return x, w, b, t


def _exact(x, w, b, t, reduction, scale=1.0):
    leaves = [a.detach().double().requires_grad_() for a in (x, w) + ((b,) if b is not None else ())]
    bias = leaves[2] if b is not None else None
    loss = F.cross_entropy(F.linear(leaves[0], leaves[1], bias), t, ignore_index=-100, reduction=reduction)
    (loss * scale).backward()
    return loss.detach(), [a.grad for a in leaves]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
# tiny, ragged, one vocabulary tile, one tile
@pytest.mark.parametrize("tile", [(1, 1), (5, 23), (16, 300), (100, 1000)])
def test_matches_pytorch_float64(rng, reduction, bias, tile):
    x, w, b, t = _inputs(rng, 37, 211, 16, bias=bias)
    leaves = [a.requires_grad_() for a in (x, w) + ((b,) if bias else ())]
    loss = linear_cross_entropy(x, w, b, t, reduction=reduction, tile=tile)
    (loss * 1.7).backward()  # a non-unit upstream gradient must scale every gradient
    exact, grads = _exact(x, w, b, t, reduction, scale=1.7)
    assert abs(loss.item() - exact.item()) <= 1e-5 * max(1.0, abs(exact.item()))
    for leaf, ref in zip(leaves, grads):
        assert leaf.grad.dtype == leaf.dtype
        assert (leaf.grad.double() - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("tile", [(2, 5), (4, 13)])  # recomputed tiles; one tile reused
def test_gradcheck_float64(rng, tile):
    x, w, b, t = _inputs(rng, 6, 13, 5, dtype=torch.float64)
    args = [a.requires_grad_() for a in (x, w, b)]
    assert torch.autograd.gradcheck(lambda *a: linear_cross_entropy(*a, t, tile=tile), args)


def test_only_requested_gradients(rng):
    x, w, b, t = _inputs(rng, 9, 31, 8)
    w.requires_grad_()
    linear_cross_entropy(x, w, b, t).backward()
    assert x.grad is None and b.grad is None and w.grad is not None
    with torch.no_grad():  # evaluation: the value only
        value = linear_cross_entropy(x, w, b, t)
    assert abs(value.item() - _exact(x, w, b, t, "mean")[0].item()) < 1e-5


def test_every_row_ignored_gives_zero_and_zero_gradients(rng):
    x, w, b, _ = _inputs(rng, 5, 11, 4)
    x.requires_grad_()
    loss = linear_cross_entropy(x, w, b, torch.full((5,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("tile", [(7, 64), (24, 300)])
def test_bfloat16_inputs_follow_an_fp32_softmax(rng, tile):
    x, w, b, t = _inputs(rng, 24, 300, 32, ignored=0.0)
    x16, w16, b16 = (a.bfloat16().requires_grad_() for a in (x, w, b))
    loss = linear_cross_entropy(x16, w16, b16, t, tile=tile)
    loss.backward()
    exact, grads = _exact(x16, w16, b16, t, "mean")  # the same bf16-rounded inputs, float64 math
    assert loss.dtype == torch.float32 and abs(loss.item() - exact.item()) < 2e-2
    for leaf, ref in zip((x16, w16, b16), grads):
        assert leaf.grad.dtype == torch.bfloat16
        assert (leaf.grad.double() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_autocast_casts_like_f_linear(rng):
    x, w, b, t = _inputs(rng, 10, 50, 8, ignored=0.0)
    w.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, b, t)
        ref = F.cross_entropy(F.linear(x, w, b).float(), t)
    loss.backward()
    assert w.grad.dtype == torch.float32  # back through the cast to the fp32 parameter
    assert abs(loss.item() - ref.item()) < 1e-2


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, w, b, t: (x, w, b, t.clone().fill_(50)), r"\[0, 50\)"),
        (lambda x, w, b, t: (x, w, b, t[:-1]), "targets must be integer"),
        (lambda x, w, b, t: (x, w, b, t.float()), "targets must be integer"),
        (lambda x, w, b, t: (x[:, :3], w, b, t), "must be"),
        (lambda x, w, b, t: (x, w, b[:-1], t), "bias"),
        (lambda x, w, b, t: (x.double(), w, b, t), "dtypes differ"),
    ],
)
def test_bad_input_is_named(rng, change, match):
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(*change(*_inputs(rng, 6, 50, 4)))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(*_inputs(rng, 6, 50, 4), reduction="none")
    with pytest.raises(ValueError, match="tile"):
        linear_cross_entropy(*_inputs(rng, 6, 50, 4), tile=(0, 8))


@pytest.mark.parametrize("targets_2d", [False, True])
def test_mlm_head_fused_loss_equals_its_logits_path(rng, targets_2d):
    torch.manual_seed(0)
    model = presets.build("declip_tiny")
    tokens = torch.randint(0, 49406, (4, 77), generator=rng)
    targets = torch.full_like(tokens, -100)
    mask = torch.rand(4, 77, generator=rng) < 0.15
    targets[mask] = torch.randint(0, 49409, (int(mask.sum()),), generator=rng)

    logits = model(text_1=tokens, mlm_positions=mask)["mlm_logits"]
    reference = F.cross_entropy(logits, targets[mask])
    reference.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    if targets_2d:  # positions read from the targets
        out = model(text_1=tokens, mlm_targets=targets)
    else:
        out = model(text_1=tokens, mlm_positions=mask, mlm_targets=targets[mask])
    assert "mlm_logits" not in out
    out["mlm_loss"].backward()
    assert abs(out["mlm_loss"].item() - reference.item()) < 1e-5
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and any("text" in n for n in grads)
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], atol=1e-6, rtol=1e-4), name

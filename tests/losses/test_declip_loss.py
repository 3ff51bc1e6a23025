"""DeCLIPLoss: each term against float64 references, the presets' weights, skipped work."""

import pytest
import torch
import torch.nn.functional as F

from declip_fast.losses import declip
from declip_fast.losses.declip import DeCLIPLoss, preset


def _clip64(img, txt, scale):
    logits = scale * img.double() @ txt.double().T
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _features(rng, b=6, e=16, vocab=50, k=7):
    unit = lambda: F.normalize(torch.randn(b, e, generator=rng, dtype=torch.float64), dim=-1).requires_grad_(True)
    raw = lambda *s: torch.randn(*s, generator=rng, dtype=torch.float64, requires_grad=True)
    return dict(
        image_features=[unit(), unit()],
        text_features=[unit(), unit()],
        logit_scale=torch.tensor(11.0, dtype=torch.float64, requires_grad=True),
        image_proj=[raw(b, 12), raw(b, 12)],
        image_pred=[raw(b, 12), raw(b, 12)],
        mlm_logits=raw(k, vocab),
        mlm_targets=torch.randint(0, vocab, (k,), generator=rng),
    )


def _terms64(f):
    imgs, txts, s = f["image_features"], f["text_features"], f["logit_scale"]
    pairs = [_clip64(i, t, s) for i in imgs for t in txts]
    cos = lambda p, z: F.cosine_similarity(p, z.detach(), dim=-1).mean()
    p, z = f["image_pred"], f["image_proj"]
    return dict(
        clip=pairs[0],
        mvs=sum(pairs) / 4,
        iss=-0.5 * (cos(p[0], z[1]) + cos(p[1], z[0])),
        tss=F.cross_entropy(f["mlm_logits"], f["mlm_targets"]),
    )


@pytest.mark.parametrize("name", ["paper", "released"])
def test_terms_and_weights_match_float64(name, rng):
    f = _features(rng)
    loss = DeCLIPLoss(preset(name, impl="torch"))
    first = loss(f)
    assert "nns" not in first, "the queue was empty: NNS must be absent, not zero"
    out = loss(f)  # the queue now holds a batch
    exact = _terms64(f)
    weights = declip.PRESETS[name]
    for term, value in exact.items():
        if weights[term]:
            assert abs(out[term].item() - value.item()) < 1e-5, term
        else:
            assert term not in out
    assert "nns" in out
    total = sum(weights[t] * out[t] for t in declip.TERMS if t in out)
    assert abs(out["total"].item() - total.item()) < 1e-6
    assert abs(first["total"].item() - (out["total"] - weights["nns"] * out["nns"]).item()) < 1e-5


def test_gradients_follow_the_weights(rng):
    f = _features(rng)
    out = DeCLIPLoss(preset("paper", nns=0.0, impl="torch"))(f)
    (out["total"] * 1.7).backward()
    exact = _terms64(f)
    ref = 1.7 * (0.4 * exact["clip"] + 0.2 * exact["mvs"] + 0.2 * exact["iss"] + 0.2 * exact["tss"])
    leaves = [*f["image_features"], *f["text_features"], f["logit_scale"], *f["image_pred"], f["mlm_logits"]]
    grads = torch.autograd.grad(ref, leaves)
    for leaf, g in zip(leaves, grads):
        assert torch.allclose(leaf.grad, g, atol=1e-6), leaf.shape
    for z in f["image_proj"]:
        assert z.grad is None, "SimSiam's targets must not receive gradient"


def test_clip_only_needs_one_view_and_no_heads(rng):
    loss = DeCLIPLoss("clip")
    assert loss.needs() == dict(image_views=1, text_views=1, simsiam=False, mlm=False)
    assert loss.simsiam is None and loss.mlm is None and loss.nns is None
    f = _features(rng)
    only = dict(
        image_features=[f["image_features"][0]], text_features=[f["text_features"][0]], logit_scale=f["logit_scale"]
    )
    out = loss(only)
    assert set(out) == {"clip", "total"}
    assert abs(out["total"].item() - _clip64(*only["image_features"], *only["text_features"], 11.0).item()) < 1e-5


def test_missing_features_and_bad_weights_are_named(rng):
    f = _features(rng)
    del f["mlm_logits"]
    with pytest.raises(ValueError, match="mlm_logits"):
        DeCLIPLoss("released")(f)
    with pytest.raises(ValueError, match="views"):
        DeCLIPLoss("released")(dict(_features(rng), image_features=[f["image_features"][0]]))
    with pytest.raises(ValueError, match="iss"):
        preset("paper", iss=-1)
    with pytest.raises(ValueError, match="preset"):
        preset("nope")


def test_a_fused_mlm_loss_from_the_model_is_used_as_the_tss_term(rng):
    f = _features(rng)
    fused = torch.tensor(3.25, dtype=torch.float64, requires_grad=True)
    del f["mlm_logits"], f["mlm_targets"]
    out = DeCLIPLoss(preset("released", impl="torch"))(dict(f, mlm_loss=fused))
    assert out["tss"] is fused
    out["total"].backward()
    assert abs(fused.grad.item() - declip.PRESETS["released"]["tss"]) < 1e-7  # total is fp32

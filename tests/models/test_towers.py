"""The towers: causal masking, EOT pooling with the mask token, activation checkpointing, the
ResNet's per-view batch norm, and initialisation on the meta device."""

import math

import pytest
import torch

from declip_fast.models import EOT_ID, MASK_ID, SOT_ID, TextConfig, TextTransformer, build
from declip_fast.models.text import eot_positions
from declip_fast.models.transformer import QuickGELU


def tiny_text(**kw) -> TextTransformer:
    cfg = TextConfig(context_length=16, width=32, heads=4, layers=2, **kw)
    return TextTransformer(cfg, output_dim=8, attn_backend="sdpa")


def captions(rng, batch=3, length=16, eot_at=(5, 9, 15)):
    tokens = torch.randint(1, SOT_ID, (batch, length), generator=rng)
    tokens[:, 0] = SOT_ID
    for row, pos in enumerate(eot_at[:batch]):
        tokens[row, pos] = EOT_ID
        tokens[row, pos + 1 :] = 0
    return tokens


def test_text_tower_is_causal(rng):
    torch.manual_seed(0)
    tower = tiny_text().eval()
    tokens = captions(rng)
    cut = 6
    changed = tokens.clone()
    changed[:, cut:] = torch.randint(1, SOT_ID, (3, 16 - cut), generator=rng)
    with torch.no_grad():
        _, states = tower(tokens, return_tokens=True)
        _, states_changed = tower(changed, return_tokens=True)
    # Positions before the change see only unchanged tokens ...
    torch.testing.assert_close(states_changed[:, :cut], states[:, :cut], rtol=0, atol=1e-6)
    # ... and the changed ones do change (the test is not vacuous).
    assert (states_changed[:, cut:] - states[:, cut:]).abs().amax() > 1e-2


def test_eot_positions_ignore_the_mask_token():
    tokens = torch.tensor(
        [
            [SOT_ID, 10, MASK_ID, 11, EOT_ID, 0, 0, 0],  # <mask> inside the caption
            [SOT_ID, 10, 11, EOT_ID, MASK_ID, EOT_ID, 0, 0],  # <mask> after EOT, a second EOT
            [SOT_ID, 10, 11, 12, 13, 14, 15, 16],  # no EOT at all
        ]
    )
    assert eot_positions(tokens).tolist() == [4, 3, 7]
    assert tokens.argmax(-1).tolist()[:2] == [2, 4]  # what argmax pooling would have picked


def test_text_pools_at_eot_and_embeds_the_mask_token(rng):
    torch.manual_seed(0)
    tower = tiny_text().eval()
    assert tower.token_embedding.num_embeddings == MASK_ID + 1
    tokens = captions(rng)
    tokens[0, 2] = MASK_ID
    tokens[1, 11] = MASK_ID  # after this row's EOT (position 9)
    with torch.no_grad():
        pooled, states = tower(tokens, return_tokens=True)
        alone = tower(tokens)
    rows = torch.arange(3)
    eot = torch.tensor([5, 9, 15])
    torch.testing.assert_close(pooled, states[rows, eot] @ tower.text_projection)
    torch.testing.assert_close(alone, pooled)
    at_argmax = states[rows, tokens.argmax(-1)] @ tower.text_projection
    assert (at_argmax[:2] - pooled[:2]).abs().amax() > 1e-3


def test_text_rejects_too_long_input():
    with pytest.raises(ValueError, match="context length"):
        tiny_text()(torch.zeros(1, 17, dtype=torch.long))


def test_quick_gelu_is_the_sigmoid_approximation():
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    torch.testing.assert_close(QuickGELU()(x), x / (1 + torch.exp(-1.702 * x)))
    exact = torch.nn.functional.gelu(x)
    assert 1e-3 < (QuickGELU()(x) - exact).abs().max() < 3e-2  # close to, but not, exact GELU


def _grads(model, images, tokens):
    model.zero_grad(set_to_none=True)
    out = model(images, None, tokens)
    image, text = out["image_features"][0], out["text_features"][0]
    (out["logit_scale"] * (image @ text.T).sigmoid().sum() + text.pow(3).sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_equal_gradients(rng):
    torch.manual_seed(0)
    model = build("clip_tiny", attn_backend="sdpa")
    images = torch.randn(2, 3, 32, 32, generator=rng)
    tokens = captions(rng, batch=2, length=32, eot_at=(7, 31))
    plain = _grads(model, images, tokens)

    calls = []
    # A pre-hook: recomputation stops early, once it has what backward needs, so it may never
    # reach a post-forward hook.
    model.visual.transformer.resblocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    model.set_grad_checkpointing(True)
    checkpointed = _grads(model, images, tokens)
    assert len(calls) == 2, "the block was not recomputed in backward: checkpointing is off"
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_resnet_views_keep_their_own_batch_statistics(rng):
    """In training, each image view is its own batch-norm batch; in eval the views share one pass."""
    torch.manual_seed(0)
    model = build("declip_tiny_rn", simsiam=None, mlm=False)
    x1 = torch.randn(4, 3, 32, 32, generator=rng)
    x2 = torch.randn(4, 3, 32, 32, generator=rng) * 3 + 1  # different statistics
    with torch.no_grad():
        views = model(x1, x2)["image_features"]
        torch.testing.assert_close(views[1], model.encode_image(x2, normalize=True))
        fused = model.encode_image(torch.cat([x1, x2]), normalize=True)[4:]
        assert (fused - views[1]).abs().amax() > 1e-3
        model.eval()
        views = model(x1, x2)["image_features"]
        torch.testing.assert_close(views[1], model.encode_image(x2, normalize=True))


@pytest.mark.parametrize("name", ["declip_tiny", "declip_tiny_rn"])
def test_init_weights_after_meta_build(name, rng):
    model = build(name, device="meta")
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    cfg = model.config
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    text_width = cfg.text.width
    # The parents' schemes win over the layers' own defaults (children are reset first).
    assert model.text.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    in_proj = model.text.transformer.resblocks[0].attn.in_proj_weight
    assert in_proj.std().item() == pytest.approx(text_width**-0.5, rel=0.1)
    if hasattr(model.visual, "layer1"):
        assert all(float(b.bn3.weight.detach().abs().max()) == 0 for b in model.visual.blocks())
        assert float(model.visual.bn1.running_var.min()) == 1.0
    size = cfg.vision.image_size
    out = model(torch.randn(2, 3, size, size, generator=rng), None, captions(rng, 2, 32, (4, 8)))
    assert all(torch.isfinite(f).all() for f in out["image_features"] + out["text_features"])

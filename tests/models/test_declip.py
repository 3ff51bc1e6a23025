"""The full model and its presets: output shapes (tiny on CPU, paper sizes on the meta device),
computing only what is asked, the forward dict the loss reads, and torch.compile."""

import math

import pytest
import torch
import torch.nn.functional as F

from declip_fast.models import EOT_ID, SOT_ID, build, get_config, list_presets

PAPER = ["declip_r50", "declip_vit_b32", "declip_vit_b16", "clip_r50", "clip_vit_b32", "clip_vit_b16"]
TINY = ["declip_tiny", "clip_tiny", "declip_tiny_rn"]
EMBED = {"declip_r50": 1024, "clip_r50": 1024}


def captions(rng, batch, length):
    tokens = torch.randint(1, SOT_ID, (batch, length), generator=rng)
    tokens[:, 0] = SOT_ID
    ends = torch.randint(2, length, (batch,), generator=rng)
    for row, end in enumerate(ends.tolist()):
        tokens[row, end] = EOT_ID
        tokens[row, end + 1 :] = 0
    return tokens


def inputs(cfg, rng, batch, device=None):
    size, length = cfg.vision.image_size, cfg.text.context_length
    if device == "meta":
        x = torch.empty(batch, 3, size, size, device="meta")
        return x, x, torch.zeros(batch, length, dtype=torch.long, device="meta")
    return (
        torch.randn(batch, 3, size, size, generator=rng),
        torch.randn(batch, 3, size, size, generator=rng),
        captions(rng, batch, length),
    )


def check_shapes(out, cfg, batch, masked):
    embed = cfg.embed_dim
    assert [f.shape for f in out["image_features"]] == [(batch, embed)] * 2
    assert [f.shape for f in out["text_features"]] == [(batch, embed)] * 2
    if cfg.simsiam is None:
        assert "image_proj" not in out and "image_pred" not in out
    else:
        assert [z.shape for z in out["image_proj"]] == [(batch, cfg.simsiam.dim)] * 2
        assert [p.shape for p in out["image_pred"]] == [(batch, cfg.simsiam.dim)] * 2
    if cfg.mlm:
        assert out["mlm_logits"].shape == (masked, cfg.text.vocab_size)
    else:
        assert "mlm_logits" not in out


def test_preset_list():
    assert set(PAPER + TINY) <= set(list_presets())


@pytest.mark.parametrize("fuse_views", [None, True])
@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_forward_on_cpu(name, rng, fuse_views):
    torch.manual_seed(0)
    model = build(name)
    model.fuse_views = fuse_views  # the CPU default runs views apart; accelerators fuse them
    cfg = model.config
    x1, x2, t1 = inputs(cfg, rng, 3)
    t2 = captions(rng, 3, cfg.text.context_length)
    mask = torch.zeros_like(t1, dtype=torch.bool)
    mask[:, 1] = True
    mask[2, 3] = True
    out = model(x1, x2, t1, t2, mlm_positions=mask if cfg.mlm else None)
    check_shapes(out, cfg, 3, masked=4)
    for f in out["image_features"] + out["text_features"]:
        torch.testing.assert_close(f.norm(dim=-1), torch.ones(3))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07)
    # The fused views equal the towers run one view at a time (ResNet: in training, by design).
    torch.testing.assert_close(out["image_features"][1], model.encode_image(x2, normalize=True))
    torch.testing.assert_close(out["text_features"][1], model.encode_text(t2, normalize=True))


@pytest.mark.parametrize("name", PAPER)
def test_paper_presets_on_meta(name):
    model = build(name, device="meta")
    cfg = model.config
    assert all(p.is_meta for p in model.parameters())
    assert cfg.embed_dim == EMBED.get(name, 512)
    assert (model.mlm_head is not None) == name.startswith("declip") == (model.projector is not None)
    x1, x2, tokens = inputs(cfg, None, 2, device="meta")
    mlm = torch.arange(5, device="meta") if cfg.mlm else None
    check_shapes(model(x1, x2, tokens, tokens, mlm_positions=mlm), cfg, 2, masked=5)


def test_clip_presets_build_no_heads():
    model = build("clip_tiny")
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if n.startswith(("projector", "predictor", "mlm_head"))]
    with pytest.raises(ValueError, match="MLM head"):
        model(None, None, torch.zeros(1, 32, dtype=torch.long), mlm_positions=torch.tensor([0]))


def test_forward_computes_only_what_is_asked(rng):
    model = build("declip_tiny")
    x1, x2, t1 = inputs(model.config, rng, 2)
    assert set(model(x1)) == {"logit_scale", "image_features"}
    assert set(model(x1, x2)) == {"logit_scale", "image_features", "image_proj", "image_pred"}
    assert set(model(None, None, t1)) == {"logit_scale", "text_features"}
    assert set(model(None, None, t1, mlm_positions=torch.tensor([1]))) == {
        "logit_scale",
        "text_features",
        "mlm_logits",
    }
    calls = []
    model.visual.register_forward_pre_hook(lambda *_: calls.append(1))
    model(None, None, t1)
    assert not calls  # no image, no image tower
    with pytest.raises(ValueError, match="images_2"):
        model(None, x2)


def test_simsiam_reads_unnormalised_features(rng):
    model = build("declip_tiny").eval()
    x1, x2, _ = inputs(model.config, rng, 2)
    out = model(x1, x2)
    raw = model.encode_image(x1)
    assert (raw.norm(dim=-1) - 1).abs().max() > 1e-2  # normalising would change the input
    torch.testing.assert_close(out["image_proj"][0], model.projector(raw))


def test_logit_scale_and_overrides():
    model = build("clip_tiny", init_logit_scale=math.log(10.0))
    assert model.logit_scale.item() == pytest.approx(math.log(10.0))
    assert model.logit_scale.shape == (1,)  # FSDP2 shards no 0-dim parameter
    assert build("clip_tiny")(None, None, torch.zeros(1, 4, dtype=torch.long))["logit_scale"].dim() == 0
    cfg = get_config("declip_tiny", vision={"image_size": 28, "patch_size": 7}, mlm=False)
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.mlm) == (28, 7, False)
    assert cfg.vision.width == 64  # untouched fields keep the preset's values
    with pytest.raises(ValueError, match=r"unknown config key\(s\): vision[.]depth"):
        get_config("declip_tiny", vision={"depth": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        build("vit_h14")


def test_blocks_cover_both_towers():
    model = build("declip_tiny")
    assert len(model.blocks()) == model.config.vision.layers + model.config.text.layers
    assert len(build("declip_tiny_rn").blocks()) == 4 + model.config.text.layers


def _step(model, forward, x1, x2, t1, t2, positions):
    out = forward(x1, x2, t1, t2, mlm_positions=positions)
    pairs = [(i, t) for i in out["image_features"] for t in out["text_features"]]
    loss = out["logit_scale"] * sum((i @ t.T).logsumexp(-1).mean() for i, t in pairs)
    loss = loss - F.cosine_similarity(out["image_pred"][0], out["image_proj"][1].detach()).mean()
    loss = loss + out["mlm_logits"].logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compiled_matches_eager(name, backend, rng, train):
    torch.manual_seed(0)
    # Training mode traces the ResNet's per-view batch norm (running statistics are updated by
    # both runs, but training outputs use batch statistics only).
    model = build(name, attn_backend="sdpa").train(train)
    x1, x2, t1 = inputs(model.config, rng, 2)
    t2 = captions(rng, 2, model.config.text.context_length)
    positions = torch.tensor([1, 2, 33])  # flat indices: no data-dependent shapes in the graph
    loss, grads = _step(model, model, x1, x2, t1, t2, positions)
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: no graph breaks
    loss_c, grads_c = _step(model, compiled, x1, x2, t1, t2, positions)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-5)
    assert grads_c.keys() == grads.keys()
    for key in grads:
        # Compiled kernels re-order fp32 sums: the error scales with the largest gradient entry
        # (the embeddings' grads reach ~40, where fp32 rounding alone is ~4e-6).
        atol = max(1e-5, 2e-6 * grads[key].abs().max().item())
        torch.testing.assert_close(grads_c[key], grads[key], rtol=1e-4, atol=atol, msg=key)


@pytest.mark.parametrize("name", ["declip_tiny", "declip_tiny_rn"])
def test_compiles_as_one_graph(name, rng):
    """Forward and backward trace into single graphs (AOT autograd, no code generation: ~10-20 s)."""
    _compiled_matches_eager(name, "aot_eager", rng, train=True)


@pytest.mark.slow
def test_compiles_with_inductor(rng):
    """The full inductor pipeline on CPU (~2 minutes on a 2-core machine with a cold cache).

    Eval mode: in training, SimSiam's batch norm over a batch of 2 is so ill-conditioned that
    inductor's re-fused arithmetic moves upstream gradients by ~1%, which says nothing about the
    model (the aot_eager test above covers training mode's graph)."""
    _compiled_matches_eager("declip_tiny", "inductor", rng, train=False)

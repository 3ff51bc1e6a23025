"""The packed text tower against the padded one, in float64: embeddings, MLM states and logits,
and every gradient equal for captions of every length 1..77 (truncated ones included), with host
lengths and without, with a filler caption (``pack_multiple``), views fused or not; the DeCLIP
objective's loss and gradients through the whole model; the SDPA bucket layout; bad lengths.

The padded path is what OpenCLIP runs (tests/models/test_openclip_parity.py holds it to OpenCLIP).
"""

import pytest
import torch

from declip_fast.losses import DeCLIPLoss
from declip_fast.models import build
from declip_fast.models.packing import BUCKET, PackPlan, lengths_from_tokens
from declip_fast.models.text import EOT_ID, MASK_ID, SOT_ID, TextConfig, TextTransformer

CONTEXT = 77
# fp64 on both paths: the same arithmetic up to summation order inside the matrix products.
TOL = 1e-11


def captions(gen, lengths, context=CONTEXT):
    """Token rows with the given lengths (start token, words, end token; a length-1 caption is a
    lone end token; 77 is a truncated caption, EOT at the last position), zeros after."""
    tokens = torch.zeros(len(lengths), context, dtype=torch.int64)
    for row, n in enumerate(lengths):
        tokens[row, :n] = torch.randint(1, SOT_ID, (n,), generator=gen)
        tokens[row, 0] = SOT_ID
        tokens[row, n - 1] = EOT_ID
    return tokens


def every_length(gen, extra=12):
    """1..77 once each, then random ones, shuffled: several captions per SDPA bucket."""
    lengths = list(range(1, CONTEXT + 1)) + torch.randint(1, CONTEXT + 1, (extra,), generator=gen).tolist()
    return [lengths[i] for i in torch.randperm(len(lengths), generator=gen).tolist()]


def tower(packed, multiple=1, seed=0):
    torch.manual_seed(seed)
    cfg = TextConfig(width=48, heads=3, layers=2, packed=packed, pack_multiple=multiple)
    return TextTransformer(cfg, 24, attn_backend="sdpa").double()


def _run(model, tokens, weights, **kwargs):
    """Features, states and every parameter's gradient of a fixed weighting of both outputs."""
    model.zero_grad(set_to_none=True)
    features, states = model(tokens, return_tokens=True, **kwargs)
    w_features, w_states = weights
    ((features * w_features).sum() + (states * w_states).sum()).backward()
    return features.detach(), states.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _close(a, b, what):
    err = (a - b).abs().max().item()
    assert err <= TOL * max(1.0, b.abs().max().item()), f"{what}: {err:.3g}"


@pytest.mark.parametrize("multiple, host", [(1, True), (1, False), (64, True)])
def test_packed_tower_equals_padded(rng, multiple, host):
    lengths = every_length(rng)
    tokens = captions(rng, lengths)
    valid = torch.arange(CONTEXT)[None] < torch.tensor(lengths)[:, None]
    # Weights on the states only where a caption's own tokens are (what the MLM head can read).
    weights = (torch.randn(len(lengths), 24, generator=rng).double(), torch.randn(*tokens.shape, 48).double())
    weights[1][~valid] = 0
    padded = _run(tower(False), tokens, weights)
    packed = _run(tower(True, multiple), tokens, weights, lengths=lengths if host else None)
    _close(packed[0], padded[0], "embeddings")
    _close(packed[1][valid], padded[1][valid], "states")
    assert torch.all(packed[1][~valid] == 0)
    assert packed[2].keys() == padded[2].keys()
    for name in padded[2]:
        _close(packed[2][name], padded[2][name], f"d {name}")
        assert padded[2][name].abs().max() > 0, name  # every gradient carries signal


def test_pack_plan_layout(rng):
    lengths = every_length(rng, extra=40)
    tokens = captions(rng, lengths)
    plan = PackPlan.build(tokens, EOT_ID, multiple=100)
    assert plan.lengths == lengths and plan.total % 100 == 0 and sum(plan.seqlens) == plan.total
    real = sum(lengths)
    assert torch.equal(tokens.reshape(-1)[plan.gather[plan.pool]], torch.full((len(lengths),), EOT_ID))
    for b, n in enumerate(lengths):  # each caption's rows, in order, at their positions
        start = int(plan.starts[b])
        assert plan.positions[start : start + n].tolist() == list(range(n))
        assert plan.gather[start : start + n].tolist() == [b * CONTEXT + p for p in range(n)]
    assert int(plan.positions.max()) < CONTEXT
    shape, to_buckets, from_buckets = plan.buckets()
    assert sum(c * n for c, n in shape) == len(to_buckets)
    assert all(n % BUCKET == 0 or n == CONTEXT for _, n in shape)
    assert torch.equal(to_buckets[from_buckets], torch.arange(plan.total))  # a round trip
    flat = torch.tensor([b * CONTEXT + n - 1 for b, n in enumerate(lengths)])
    assert torch.equal(plan.packed_index(flat), plan.pool)
    assert real <= plan.total < real + 100


def test_lengths_from_tokens():
    tokens = torch.tensor([[SOT_ID, 5, EOT_ID, 0], [EOT_ID, 0, 0, 0], [SOT_ID, 1, 2, 3]])
    assert lengths_from_tokens(tokens, EOT_ID).tolist() == [3, 1, 4]  # no EOT: the whole row


@pytest.mark.parametrize("lengths, match", [([3, 4], "2 caption lengths for 3 captions"), ([3, 0, 4], "1..77")])
def test_bad_lengths_are_named(rng, lengths, match):
    with pytest.raises(ValueError, match=match):
        tower(True)(captions(rng, [3, 4, 5]), lengths=lengths)


@pytest.mark.parametrize("fuse", [False, True])
def test_declip_objective_packed_equals_padded(rng, fuse):
    """The whole model under the released objective (two text views, MLM through the fused head; NNS
    is absent while its queue fills, and reads the text features compared here):
    loss terms and every parameter's gradient, packed (host lengths, views fused or not) vs padded."""
    b = 24
    lengths_1, lengths_2 = every_length(rng)[:b], every_length(rng)[:b]
    text_1, text_2 = captions(rng, lengths_1), captions(rng, lengths_2)
    targets = torch.full_like(text_1, -100)
    for row, n in enumerate(lengths_1):
        if n > 2:  # mask strictly between start and end, as the loaders do
            p = 1 + row % (n - 2)
            targets[row, p], text_1[row, p] = text_1[row, p], MASK_ID
    images = torch.randn(2, b, 3, 32, 32, generator=rng).double()

    def run(packed):
        torch.manual_seed(0)
        model = build("declip_tiny", attn_backend="sdpa").double()
        model.text.cfg.packed, model.fuse_views = packed, fuse
        loss_fn = DeCLIPLoss("released", embed_dim=model.config.embed_dim).double()
        lengths = dict(text_1_lengths=lengths_1, text_2_lengths=lengths_2) if packed else {}
        out = model(images[0], images[1], text_1, text_2, mlm_targets=targets, **lengths)
        losses = loss_fn(out)
        losses["total"].backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return {k: v.detach() for k, v in losses.items() if torch.is_tensor(v)}, grads

    (loss_pad, grads_pad), (loss_packed, grads_packed) = run(False), run(True)
    assert loss_packed.keys() == loss_pad.keys()
    for key in loss_pad:
        _close(loss_packed[key], loss_pad[key], key)
    assert grads_packed.keys() == grads_pad.keys()
    assert any(n.startswith("mlm_head") for n in grads_pad)
    for name in grads_pad:
        _close(grads_packed[name], grads_pad[name], f"d {name}")


def test_compiled_blocks_see_few_shapes(rng):
    """The trainer's compile path (``before_compile`` hooks, then each block compiled; AOT autograd
    without code generation here): packed results equal eager ones for every batch, and once
    warm, new caption lengths compile no new graphs (packed lengths in multiples of 64, the
    packed attention kept out of the graphs)."""
    import torch._dynamo as dynamo

    dynamo.reset()
    model = tower(True)
    eager = tower(True)
    for module in model.modules():
        if hasattr(module, "before_compile"):
            module.before_compile()
    assert model.cfg.pack_multiple == 64
    for block in model.blocks():
        block.compile(backend="aot_eager")
    graphs = []
    for _ in range(7):
        lengths = torch.randint(2, CONTEXT + 1, (16,), generator=rng).tolist()
        tokens = captions(rng, lengths)
        got, want = model(tokens, lengths=lengths), eager(tokens, lengths=lengths)
        got.sum().backward()
        _close(got.detach(), want.detach(), "compiled embeddings")
        graphs.append(dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[3] == graphs[-1], graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packed_on_cuda_matches_padded(rng, dtype):
    """On a GPU the packed tower attends through xformers' BlockDiagonalCausalMask (SDPA buckets
    where xformers does not import): embeddings and gradients against the padded SDPA tower in the
    same dtype, within that dtype's rounding over two layers."""
    lengths = every_length(rng)
    tokens = captions(rng, lengths).cuda()
    weights = (torch.randn(len(lengths), 24, generator=rng).cuda(), torch.zeros(*tokens.shape, 48).cuda())
    results = []
    for packed in (False, True):
        model = tower(packed).float().cuda()
        if packed:  # xformers where it imports
            model.transformer.resblocks.apply(
                lambda m: setattr(m, "backend", "auto") if hasattr(m, "backend") else None
            )
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            results.append(_run(model, tokens, weights, **({"lengths": lengths} if packed else {})))
    (pad_f, _, pad_g), (pack_f, _, pack_g) = results
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    assert (pack_f.float() - pad_f.float()).abs().max() <= tol * pad_f.float().abs().max()
    for name in pad_g:
        err = (pack_g[name].float() - pad_g[name].float()).abs().max()
        assert err <= tol * max(pad_g[name].float().abs().max(), 1e-6), name

"""The mixed-precision contract (``declip_fast.losses.clip.autocast_inputs``) against OpenCLIP's
ClipLoss, PyTorch's autocast and float64: loss dtype as OpenCLIP's in every context, values and
gradients at least as accurate, and a GradScaler (fp16 autocast) that never skips a step."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from declip_fast.kernels import reference
from declip_fast.losses import ClipLoss, DeCLIPLoss, NNSLoss
from declip_fast.losses.declip import preset
from declip_fast.losses.nns import nearest

open_clip_loss = pytest.importorskip("open_clip.loss")

# (autocast dtype or None, feature dtype): plain 32/16-bit, then autocast with fp32 features
# (autocast's normalize hands the loss fp32) and with 16-bit ones.
CONTEXTS = [
    (None, torch.float32),
    (None, torch.bfloat16),
    (None, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float16, torch.float16),
]
IDS = [f"{'autocast-' + str(a)[6:] if a else 'plain'}-{str(f)[6:]}" for a, f in CONTEXTS]
# 7/4 is exact in every dtype: a bf16 loss's upstream gradient of 1.7 would itself be off by 2e-3.
UPSTREAM = 1.75


def _autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()


def _features(b=256, d=64, seed=0):
    """Uncorrelated unit rows at scale 14: logits of a few units, a softmax far from one-hot,
    so every gradient is well away from zero (a confident regime would hide errors in them)."""
    gen = torch.Generator().manual_seed(seed)
    unit = lambda: F.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=-1)
    return unit(), unit(), torch.tensor(14.0)


def _run(loss_fn, img, txt, scale, ctx=None):
    img, txt, scale = (t.clone().requires_grad_(True) for t in (img, txt, scale))
    with ctx if ctx is not None else contextlib.nullcontext():
        loss = loss_fn(img, txt, scale)
    (loss * UPSTREAM).backward()
    return loss.detach(), img.grad, txt.grad, scale.grad


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("amp, dtype", CONTEXTS, ids=IDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_open_clip_in_every_precision_context(amp, dtype, seed):
    img64, txt64, scale = _features(seed=seed)
    img, txt = img64.to(dtype), txt64.to(dtype)
    ours = _run(ClipLoss(), img, txt, scale, _autocast(amp))
    theirs = _run(open_clip_loss.ClipLoss(), img, txt, scale, _autocast(amp))
    # float64 of the features both losses compute with: autocast rounds them to its dtype (in
    # OpenCLIP's matmul as in our cast), a rounding of the inputs and no error of either loss.
    compute = amp or dtype
    exact = _run(reference.clip_loss_dense, img.to(compute).double(), txt.to(compute).double(), scale.double())

    names = ("loss", "d image", "d text", "d logit_scale")
    for name, a, b in zip(names, ours, theirs):
        assert a.dtype == b.dtype, f"{name}: ours {a.dtype}, OpenCLIP's {b.dtype}"
    assert ours[0].dtype == (torch.float32 if amp else dtype)

    ours_err, theirs_err = _err(ours[0], exact[0]), _err(theirs[0], exact[0])
    # Two fp32 results a rounding apart cannot be ordered: in plain fp32 both land within an ulp
    # or so of float64 (measured 0.0-1.3 ulp each, either side ahead). Elsewhere ours is
    # computed in fp32 and rounded once, so it is never behind OpenCLIP's 16-bit arithmetic.
    slack = torch.finfo(torch.float32).eps * exact[0].abs().item() if compute == torch.float32 else 0.0
    assert ours_err <= theirs_err + slack, f"loss error {ours_err:.3g} > OpenCLIP's {theirs_err:.3g}"

    for name, a, b, e in list(zip(names, ours, theirs, exact))[1:]:
        assert torch.isfinite(a).all(), name
        # At most twice PyTorch's own error in this context, plus half an ulp of the largest
        # gradient in the compute dtype: the rounding of returning a gradient in that dtype.
        atol = 0.5 * torch.finfo(compute).eps * e.abs().max().item()
        bound = 2 * _err(b, e) + atol
        assert bound < e.abs().max().item(), f"{name}: bound {bound:.3g} not below the gradient"
        assert _err(a, e) <= bound, f"{name}: error {_err(a, e):.3g} > {bound:.3g}"


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_autocast_casts_fp32_features_to_its_dtype(amp):
    """Under autocast fp32 features are the 16-bit ones (what the fused kernel needs to run at
    16-bit speed): the same loss, bit for bit, as features rounded beforehand; gradients fp32."""
    img, txt, scale = _features(b=64, d=32)
    fp32 = _run(ClipLoss(), img.float(), txt.float(), scale, _autocast(amp))
    rounded = _run(ClipLoss(), img.to(amp), txt.to(amp), scale, _autocast(amp))
    assert torch.equal(fp32[0], rounded[0])
    assert fp32[1].dtype == fp32[2].dtype == torch.float32
    assert torch.equal(fp32[1], rounded[1].float()) and torch.equal(fp32[3], rounded[3])


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_reference_kernel_is_not_re_autocast_inside(amp):
    """The tiled loss's products stay fp32 under an active autocast (a 16-bit torch.mm would
    round every logit): the loss and gradients of 16-bit inputs do not depend on autocast."""
    img, txt, scale = _features(b=64, d=32)
    img, txt = img.to(amp), txt.to(amp)
    fn = lambda i, t, s: reference.clip_loss(i, t, s, out_dtype=torch.float32)
    outside = _run(fn, img, txt, scale)
    inside = _run(fn, img, txt, scale, _autocast(amp))
    for a, b in zip(outside, inside):
        assert torch.equal(a, b)


def test_fp16_grad_scaler_never_skips_a_step():
    """OpenCLIP's ``--precision amp`` loop by hand: fp16 autocast, GradScaler at its initial
    65536. An fp16 loss receives 65536 as its gradient, inf in fp16: the first step is skipped
    and the scale halved. An fp32 loss keeps every step and the scale."""
    torch.manual_seed(0)
    towers = torch.nn.ModuleList([torch.nn.Linear(32, 16), torch.nn.Linear(32, 16)])
    scale = torch.nn.Parameter(torch.tensor(14.0).log())
    optimizer = torch.optim.SGD([*towers.parameters(), scale], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = torch.randn(64, 32), torch.randn(64, 32)
    for step in range(3):
        before = [p.detach().clone() for p in towers.parameters()]
        with torch.autocast("cpu", dtype=torch.float16):
            img = F.normalize(towers[0](x), dim=-1)
            txt = F.normalize(towers[1](y), dim=-1)
            loss = ClipLoss()(img, txt, scale.exp())
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        assert scaler.get_scale() == 65536.0, f"step {step} skipped: scale now {scaler.get_scale()}"
        assert all(not torch.equal(a, p) for a, p in zip(before, towers.parameters())), step


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_cuda_autocast_runs_the_16_bit_kernel_and_returns_float32(amp):
    """On CUDA the same contract with the fused kernel: fp32 features under autocast give the
    loss of their 16-bit rounding (the kernel saw 16-bit inputs), in fp32, and OpenCLIP's dtypes."""
    img, txt, scale = (t.float().cuda() for t in _features())
    ctx = lambda: torch.autocast("cuda", dtype=amp)
    ours = _run(ClipLoss(impl="triton"), img, txt, scale, ctx())
    rounded = _run(ClipLoss(impl="triton"), img.to(amp), txt.to(amp), scale, ctx())
    theirs = _run(open_clip_loss.ClipLoss(), img, txt, scale, ctx())
    exact = _run(reference.clip_loss_dense, img.to(amp).double(), txt.to(amp).double(), scale.double())
    assert [t.dtype for t in ours] == [t.dtype for t in theirs] == [torch.float32] * 4
    assert torch.equal(ours[0], rounded[0])
    assert _err(ours[0], exact[0]) <= _err(theirs[0], exact[0])
    assert all(torch.isfinite(t).all() for t in ours[1:])


def _unique_bank(gen, m=48, d=32):
    return F.normalize(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=-1)


def test_nearest_under_autocast_takes_an_fp32_bank_and_16_bit_queries():
    """An fp32 queue serves bf16 queries under autocast (both searched in bf16, as autocast's
    matmul would); outside autocast mixed dtypes stay an error."""
    gen = torch.Generator().manual_seed(1)
    bank = _unique_bank(gen)
    picks = torch.randperm(bank.shape[0], generator=gen)[:10]
    # Queries near chosen rows: the best score leads the next by far more than bf16's rounding.
    noise = torch.randn(10, 32, generator=gen, dtype=torch.float64)
    queries = F.normalize(bank[picks] + 0.2 * noise, dim=-1)
    q16, bank32 = queries.to(torch.bfloat16), bank.float()
    with pytest.raises(ValueError, match="one floating dtype"):
        nearest(q16, bank32, impl="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, index = nearest(q16, bank32, impl="torch")
    sims = q16.double() @ bank32.to(torch.bfloat16).double().T  # both as autocast casts them
    assert scores.dtype == torch.float32
    assert torch.equal(index, picks) and torch.equal(index, sims.argmax(dim=1))
    # bf16 inputs have 8-bit significands, so each product is exact in fp32; summing 32 of them
    # rounds a few times at scores below 1 (fp32 eps 1.2e-7).
    assert _err(scores, sims.max(dim=1).values) <= 1e-6


def test_nns_loss_under_autocast_is_float32_and_accurate():
    """As PyTorch's CE under autocast: fp32, from bf16 views against an fp32 queue."""
    gen = torch.Generator().manual_seed(2)
    b, d, bf16 = 16, 32, torch.bfloat16
    first = 3.0 * _unique_bank(gen, b, d)
    perm = torch.randperm(b, generator=gen)
    # Each text lies near one queued row: the search finds it whatever the precision.
    noise = lambda: torch.randn(b, d, generator=gen, dtype=torch.float64)
    texts = (first[perm] + 0.2 * noise()).to(bf16)
    images = [F.normalize(first[perm] + noise(), dim=-1).to(bf16) for _ in range(2)]
    scale = torch.tensor(14.0)
    nns = NNSLoss(queue_size=64, impl="torch", dtype=torch.float32)
    assert nns(images, [first.to(bf16)], scale) is None  # fills the queue
    queued = nns.queue.rows[:b]

    leaves = [x.clone().requires_grad_(True) for x in images]
    labels = torch.arange(b)
    with torch.autocast("cpu", dtype=bf16):
        loss = nns(leaves, [texts], scale, enqueue=False)
        # PyTorch's own: autocast's matmul in bf16, its cross_entropy in fp32.
        torch_loss = sum(F.cross_entropy(scale * x @ queued[perm].T, labels) for x in images) / 2
    (loss * UPSTREAM).backward()
    keys = queued[perm].to(bf16).double()  # the neighbours, as autocast casts them
    exact = sum(F.cross_entropy(scale.double() * x.double() @ keys.T, labels) for x in images) / 2
    assert loss.dtype == torch_loss.dtype == torch.float32
    assert _err(loss, exact) <= _err(torch_loss, exact)
    assert all(x.grad.dtype == bf16 and torch.isfinite(x.grad).all() for x in leaves)


def test_declip_loss_terms_are_float32_under_autocast():
    """Every term as its PyTorch counterpart under autocast: fp32, from 16-bit features."""
    gen = torch.Generator().manual_seed(3)
    b, e, vocab = 8, 16, 40
    unit = lambda: F.normalize(torch.randn(b, e, generator=gen), dim=-1).to(torch.bfloat16)
    raw = lambda *s: torch.randn(*s, generator=gen).to(torch.bfloat16)
    f = dict(
        image_features=[unit(), unit()],
        text_features=[unit(), unit()],
        logit_scale=torch.tensor(11.0),
        image_proj=[raw(b, 12), raw(b, 12)],
        image_pred=[raw(b, 12), raw(b, 12)],
        mlm_logits=raw(5, vocab),
        mlm_targets=torch.randint(0, vocab, (5,), generator=gen),
    )
    loss = DeCLIPLoss(preset("paper", impl="torch", queue_size=64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss(f)  # fills the NNS queue
        out = loss(f)
    assert set(out) == {"clip", "mvs", "iss", "tss", "nns", "total"}
    assert {k: v.dtype for k, v in out.items()} == {k: torch.float32 for k in out}

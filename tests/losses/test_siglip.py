"""SigLipLoss against OpenCLIP's SigLipLoss (the peer we must match) and float64 math; the
kernel's memory (gradients only, never B x N), dtypes, autocast and input checks."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from declip_fast import kernels
from declip_fast.kernels import reference_siglip
from declip_fast.losses import SigLipLoss

open_clip_loss = pytest.importorskip("open_clip.loss")

REPO = Path(__file__).resolve().parents[2]
NAMES = ("loss", "d image", "d text", "d logit_scale", "d logit_bias")
# fp32: the acceptance bound; fp64: both sides exact to ~1e-14, room for the tiled summation order.
ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _features(b, d, dtype, gen, n=None):
    img = torch.nn.functional.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=-1)
    txt = torch.randn(n or b, d, generator=gen, dtype=torch.float64)
    txt[:b] += 2.0 * img  # correlated pairs, as trained towers give: positives far from 0
    return img.to(dtype), torch.nn.functional.normalize(txt, dim=-1).to(dtype)


def _scalars(gen, dtype):
    scale = math.exp(torch.rand((), generator=gen).item() * math.log(100))  # 1..100
    bias = -15.0 * torch.rand((), generator=gen).item()
    return torch.tensor(scale, dtype=dtype), torch.tensor(bias, dtype=dtype)


def _run(loss_fn, img, txt, scale, bias, upstream=1.7):
    """(loss, d image, d text, d scale, d bias), every input requiring grad."""
    leaves = [t.clone().requires_grad_(True) for t in (img, txt, scale, bias)]
    loss = loss_fn(*leaves)
    # A non-unit upstream gradient catches a backward that assumes d(out) = 1.
    (loss * upstream).backward()
    return (loss.detach(), *(t.grad for t in leaves))


def _assert_close(ours, theirs, atol, names=NAMES):
    """Each quantity within ``atol`` times its size (its largest entry, at least 1)."""
    for name, a, b in zip(names, ours, theirs):
        assert a.dtype == b.dtype, f"{name}: {a.dtype} vs {b.dtype}"
        err = (a.double() - b.double()).abs().max().item()
        bound = atol * max(1.0, b.double().abs().max().item())
        assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [3, 100, 513])
@pytest.mark.parametrize("b", [1, 7, 130])
def test_matches_open_clip(b, d, dtype, rng):
    img, txt = _features(b, d, dtype, rng)
    scale, bias = _scalars(rng, dtype)
    ours = _run(SigLipLoss(), img, txt, scale, bias)
    theirs = _run(open_clip_loss.SigLipLoss(), img, txt, scale, bias)
    _assert_close(ours, theirs, ATOL[dtype])


def test_no_bias_and_output_dict_as_open_clip(rng):
    """OpenCLIP's forward takes logit_bias=None (its get_logits adds nothing): so does ours."""
    img, txt = _features(9, 16, torch.float64, rng)
    scale = torch.tensor(7.0, dtype=torch.float64)
    ours = SigLipLoss()(img, txt, scale, None, output_dict=True)
    theirs = open_clip_loss.SigLipLoss()(img, txt, scale, None, output_dict=True)
    assert set(ours) == set(theirs) == {"contrastive_loss"}
    torch.testing.assert_close(ours["contrastive_loss"], theirs["contrastive_loss"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("offset", [None, 0, 4, 23])
@pytest.mark.parametrize("block", [(1, 1), (3, 5), (8, 30), (64, 64), None])
def test_tiling_and_offsets_exact_in_float64(offset, block, rng):
    """Every tile split (uneven edges, positives across tile borders) gives the dense answer; with
    no block the walk runs over the 30 text rows (the longer side), positives at -offset."""
    img, txt = _features(7, 12, torch.float64, rng, n=30)
    scale, bias = torch.tensor(4.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    ours = _run(lambda *a: reference_siglip.siglip_loss(*a, offset, block=block), img, txt, scale, bias)
    dense = _run(lambda *a: reference_siglip.siglip_loss_dense(*a, offset), img, txt, scale, bias)
    _assert_close(ours, dense, 1e-12)


def test_negative_only_block_matches_open_clip(rng):
    img, txt = _features(6, 10, torch.float64, rng)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    ours = SigLipLoss()._loss(img, txt, scale, bias, negative_only=True)
    theirs = open_clip_loss.SigLipLoss()._loss(img, txt, scale, bias, negative_only=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)


def test_dense_helpers_are_open_clips(rng):
    img, txt = _features(5, 8, torch.float32, rng)
    ours, theirs = SigLipLoss(), open_clip_loss.SigLipLoss()
    for neg in (False, True):
        assert torch.equal(
            ours.get_ground_truth("cpu", torch.float32, 5, neg), theirs.get_ground_truth("cpu", torch.float32, 5, neg)
        )
    s, b = torch.tensor(3.0), torch.tensor(-1.0)
    assert torch.equal(ours.get_logits(img, txt, s, b), theirs.get_logits(img, txt, s, b))
    assert (ours.prev_num_logits, ours.labels, ours.dist_impl) == (0, {}, "bidir")


@pytest.mark.parametrize("wanted", [(0,), (1,), (2,), (3,), (0, 3), ()])
def test_only_the_gradients_asked_for(wanted, rng):
    img, txt = _features(7, 5, torch.float64, rng, n=11)
    inputs = [img, txt, torch.tensor(6.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)]
    leaves = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
    dense = _run(lambda *a: reference_siglip.siglip_loss_dense(*a, 2), *inputs)
    loss = reference_siglip.siglip_loss(*leaves, 2)
    torch.testing.assert_close(loss, dense[0], rtol=1e-12, atol=0)
    if wanted:
        (loss * 1.7).backward()
    for i, leaf in enumerate(leaves):
        if i in wanted:
            torch.testing.assert_close(leaf.grad, dense[1 + i], rtol=1e-11, atol=1e-12)
        else:
            assert leaf.grad is None


def _saved_bytes(fn, *args) -> tuple[int, list]:
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(*args)
    loss.backward()
    return sum(t.numel() * t.element_size() for t in saved), saved


def test_saves_only_the_gradients_never_the_logits(rng):
    """What the backward keeps: dA [B, D] and dB [N, D] (and two scalars), at N = 4096, D = 64:
    2 MiB against the 64 MiB of one N x N fp32 matrix (OpenCLIP saves several)."""
    n, d = 4096, 64
    img, txt = _features(n, d, torch.float32, rng)
    leaves = [t.requires_grad_(True) for t in (img, txt, torch.tensor(10.0), torch.tensor(-10.0))]
    ours, saved = _saved_bytes(SigLipLoss(), *leaves)
    assert max(t.numel() for t in saved) == n * d
    assert ours <= 2 * n * d * 4 + 64
    with torch.no_grad():  # no gradient wanted: nothing computed, nothing kept
        assert SigLipLoss()(*leaves).grad_fn is None


@pytest.mark.slow
def test_peak_memory_far_below_the_logits():
    """The peak extra resident memory of forward + backward at N = 4096, D = 64, fp32, measured by
    the benchmark's fresh-process probe, stays below a quarter of one N x N fp32 matrix (64 MiB)."""
    n, d = 4096, 64
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_siglip", "--impl", "ours", "--n", str(n), "--d", str(d)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    extra = json.loads(out.stdout)["extra_bytes"]
    assert extra < n * n * 4 / 4, f"peak extra {extra / 2**20:.1f} MiB"


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_autocast_output_dtype_as_open_clip(amp, rng):
    """Under CPU autocast OpenCLIP's loss is float32 for float32 features (its labels take the
    features' dtype); ours too, with the products of the 16-bit-rounded features (autocast's
    matmul inputs) accumulated in fp32; OpenCLIP also rounds its logits to 16 bits, hence the
    loose bound against it and the tight one against float64 on the rounded features."""
    img, txt = _features(33, 40, torch.float32, rng)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    with torch.autocast("cpu", dtype=amp):
        ours = _run(SigLipLoss(), img, txt, scale, bias)
        theirs = _run(open_clip_loss.SigLipLoss(), img, txt, scale, bias)
    assert [t.dtype for t in ours] == [t.dtype for t in theirs] == [torch.float32] * 5
    _assert_close(ours, theirs, 3e-2)
    rounded = [t.to(amp).double() for t in (img, txt)]
    exact = _run(reference_siglip.siglip_loss_dense, *rounded, scale.double(), bias.double())
    _assert_close(ours[:1], [exact[0].float()], 1e-5)


def test_autocast_16bit_features_give_a_float32_loss(rng):
    """The one deliberate difference: 16-bit features under autocast give OpenCLIP a 16-bit loss,
    ours a float32 one (the autocast_inputs contract); gradients keep the features' dtype."""
    img, txt = _features(16, 24, torch.bfloat16, rng)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _run(SigLipLoss(), img, txt, scale, bias)
        theirs = _run(open_clip_loss.SigLipLoss(), img, txt, scale, bias)
    assert theirs[0].dtype == torch.bfloat16 and ours[0].dtype == torch.float32
    assert [t.dtype for t in ours[1:]] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    assert abs(ours[0].item() - theirs[0].item()) <= 3e-2 * abs(theirs[0].item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs_without_autocast(dtype, rng):
    """Computed in fp32 from the 16-bit inputs; the loss and each gradient in its input's dtype."""
    img, txt = _features(20, 32, dtype, rng)
    scale, bias = torch.tensor(10.0, dtype=dtype), torch.tensor(-10.0, dtype=dtype)
    ours = _run(SigLipLoss(), img, txt, scale, bias)
    assert [t.dtype for t in ours] == [dtype] * 5
    exact = _run(reference_siglip.siglip_loss_dense, *(t.double() for t in (img, txt, scale, bias)))
    _assert_close(ours, [t.to(dtype) for t in exact], 1e-2)
    out32 = kernels.siglip_loss(img, txt, scale, bias, out_dtype=torch.float32)
    assert out32.dtype == torch.float32 and abs(out32.item() - exact[0].item()) <= 1e-5 * abs(exact[0].item())


def test_same_bits_every_run(rng):
    img, txt = _features(300, 48, torch.float32, rng, n=700)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    fn = lambda *a: reference_siglip.siglip_loss(*a, 100, block=(64, 256))
    first, second = _run(fn, img, txt, scale, bias), _run(fn, img, txt, scale, bias)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_dispatch_and_modes(rng):
    img, txt = _features(4, 6, torch.float64, rng, n=8)
    s, b = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    assert kernels.KERNELS["siglip"] == "siglip"
    assert kernels.resolve_impl("auto", img, "siglip") == "torch"
    with pytest.raises(ValueError, match="CUDA"):
        kernels.siglip_loss(img, txt, s, b, impl="triton")
    with pytest.raises(ValueError, match="mode"):
        kernels.siglip_loss(img, txt, s, b, mode="rows")
    # Without a process group the gathered mode takes the layout as given.
    local = kernels.siglip_loss(img, txt, s, b, offset=4)
    assert torch.equal(kernels.siglip_loss(img, txt, s, b, offset=4, mode="gathered"), local)
    torch.testing.assert_close(local, reference_siglip.siglip_loss_dense(img, txt, s, b, 4), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.zeros(3, 4), torch.zeros(5, 3)), "dim 4 but text has dim 3"),
        ((torch.zeros(3, 4), torch.zeros(5, 4, dtype=torch.float64)), "image is torch.float32 but text"),
        ((torch.zeros(3, 4, 1), torch.zeros(5, 4)), "image must be a non-empty 2-D"),
        ((torch.zeros(0, 4), torch.zeros(5, 4)), "image must be a non-empty 2-D"),
        ((torch.zeros(3, 4, dtype=torch.long), torch.zeros(5, 4, dtype=torch.long)), "floating point"),
        ((torch.zeros(3, 4), torch.zeros(5, 4, device="meta")), "text is on meta"),
        ((torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2)), "logit_scale must be a one-element"),
        ((torch.zeros(3, 4), torch.zeros(5, 4), torch.tensor(1.0), torch.tensor(1)), "logit_bias must be"),
        (
            (torch.zeros(3, 4), torch.zeros(5, 4), torch.tensor(1.0), torch.tensor(0.0), 3),
            r"offset must be .* \[0, 2\]",
        ),
        ((torch.zeros(3, 4), torch.zeros(5, 4), torch.tensor(1.0), torch.tensor(0.0), True), "offset must be"),
    ],
)
def test_input_checks(args, message):
    defaults = (None, None, torch.tensor(1.0), torch.tensor(0.0), 0)
    args = args + defaults[len(args) :]
    with pytest.raises(ValueError, match=message):
        reference_siglip.siglip_loss(*args)


def test_constructor_checks():
    assert SigLipLoss(dist_impl="gather", chunk_size=128).dist_impl == "gather"
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="chunk_size"):
        SigLipLoss(chunk_size=0)
    with pytest.raises(ValueError, match="rank"):
        SigLipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="impl"):
        SigLipLoss(impl="cuda")
    with pytest.raises(RuntimeError, match="process group"):
        SigLipLoss(rank=0, world_size=2)(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor(1.0), torch.tensor(0.0))

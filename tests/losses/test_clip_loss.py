"""ClipLoss against OpenCLIP's ClipLoss (the peer we must match) and float64 math."""

import math

import pytest
import torch

from declip_fast.kernels import reference
from declip_fast.losses import ClipLoss

open_clip_loss = pytest.importorskip("open_clip.loss")


def _features(b, d, dtype, gen, normalize=True):
    img = torch.randn(b, d, generator=gen, dtype=torch.float64)
    txt = torch.randn(b, d, generator=gen, dtype=torch.float64)
    # Make the pairs correlated, as trained towers are, so the loss is not flat.
    txt = txt + 2.0 * img
    if normalize:
        img = torch.nn.functional.normalize(img, dim=-1)
        txt = torch.nn.functional.normalize(txt, dim=-1)
    return img.to(dtype), txt.to(dtype)


def _run(loss_fn, img, txt, scale, bias=None, upstream=1.7):
    img = img.clone().requires_grad_(True)
    txt = txt.clone().requires_grad_(True)
    scale = scale.clone().requires_grad_(True)
    args = (img, txt, scale) if bias is None else (img, txt, scale, bias)
    loss = loss_fn(*args)
    # A non-unit upstream gradient catches kernels that assume d(out) = 1.
    (loss * upstream).backward()
    return loss.detach(), img.grad, txt.grad, scale.grad


def _assert_close(ours, theirs, atol):
    names = ("loss", "d image", "d text", "d logit_scale")
    for name, a, b in zip(names, ours, theirs):
        assert a.dtype == b.dtype, name
        err = (a.double() - b.double()).abs().max().item()
        assert err <= atol, f"{name}: max abs error {err:.3g} > {atol}"


# fp32: the acceptance bound. fp64: both sides are exact to ~1e-13; 1e-10 leaves room for the
# different summation order of a tiled reduction.
ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [3, 64, 640])
@pytest.mark.parametrize("b", [1, 7, 130, 1000])
def test_matches_open_clip(b, d, dtype, rng):
    img, txt = _features(b, d, dtype, rng)
    scale = torch.tensor(math.exp(torch.rand((), generator=rng).item() * math.log(100)), dtype=dtype)
    ours = _run(ClipLoss(), img, txt, scale)
    theirs = _run(open_clip_loss.ClipLoss(), img, txt, scale)
    _assert_close(ours, theirs, ATOL[dtype])


@pytest.mark.parametrize("block", [(1, 1), (3, 5), (64, 17), (130, 130)])
def test_tiling_is_exact_in_float64(block, rng):
    """Every tile split (rows and columns, uneven edges) gives the dense float64 answer."""
    img, txt = _features(130, 24, torch.float64, rng, normalize=False)
    scale = torch.tensor(3.3, dtype=torch.float64)
    ours = _run(lambda i, t, s: reference.clip_loss(i, t, s, block=block), img, txt, scale)
    dense = _run(reference.clip_loss_dense, img, txt, scale)
    _assert_close(ours, dense, 1e-11)


@pytest.mark.parametrize("offset", [0, 5, 23])
def test_rows_loss_matches_cross_entropy(offset, rng):
    """One-direction InfoNCE with labels offset + i, against torch's cross_entropy in float64."""
    q = torch.randn(7, 16, generator=rng, dtype=torch.float64)
    k = torch.randn(30, 16, generator=rng, dtype=torch.float64)
    scale = torch.tensor(2.5, dtype=torch.float64)

    def dense(q, k, s):
        labels = torch.arange(q.shape[0]) + offset
        return torch.nn.functional.cross_entropy(s * q @ k.T, labels)

    def tiled(q, k, s):
        return reference.clip_loss_rows(q, k, s, offset, block=(3, 4))

    _assert_close(_run(tiled, q, k, scale), _run(dense, q, k, scale), 1e-11)


def test_logit_bias_matches_open_clip(rng):
    img, txt = _features(33, 40, torch.float32, rng)
    scale = torch.tensor(20.0)
    results = []
    for cls in (ClipLoss, open_clip_loss.ClipLoss):
        bias = torch.tensor(-3.0, requires_grad=True)
        out = _run(cls(), img, txt, scale, bias=bias)
        results.append(out + (bias.grad,))
    (*ours, ours_db), (*theirs, theirs_db) = results
    _assert_close(ours, theirs, 1e-5)
    assert abs(ours_db.item() - theirs_db.item()) <= 1e-5


def test_output_dict_and_scale_shapes(rng):
    img, txt = _features(9, 8, torch.float32, rng)
    out = ClipLoss()(img, txt, torch.tensor([10.0]), output_dict=True)
    expected = open_clip_loss.ClipLoss()(img, txt, torch.tensor(10.0))
    assert set(out) == {"contrastive_loss"}
    assert torch.allclose(out["contrastive_loss"], expected, atol=1e-6)
    # A plain float scale works too, as it does in OpenCLIP.
    assert torch.allclose(ClipLoss()(img, txt, 10.0), expected, atol=1e-6)


def test_half_inputs_follow_float32_math(rng):
    """fp16/bf16 features are computed in fp32 and the loss comes back in the input dtype."""
    img, txt = _features(50, 32, torch.float32, rng)
    scale = torch.tensor(50.0)
    exact = reference.clip_loss_dense(img.double(), txt.double(), scale.double())
    for dtype in (torch.float16, torch.bfloat16):
        loss = ClipLoss()(img.to(dtype), txt.to(dtype), scale)
        assert loss.dtype == dtype
        # Rounding the inputs to the half type moves logits of size s=50 by ~s * eps_half.
        eps = torch.finfo(dtype).eps
        assert abs(loss.double().item() - exact.item()) <= 2 * 50 * eps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_large_logits_lose_no_precision(seed):
    """Norm-5 features at scale 100: logits up to 2500 and a loss about 1. Summing N log-sum-exps
    of ~2500 and subtracting N positives loses the loss in the rounding of the sums (N = 1024:
    2e-5 to 1.6e-4 off in fp32, 300x-10,000x OpenCLIP's error, measured over 8 seeds); per-row
    terms, as cross_entropy sums them, keep it.

    The features lie on a grid of eighths, so every logit is exact in fp32 and the error measured
    is the reduction's alone, not the BLAS's rounding of the logits (which differs, either way
    round, between any two matmuls). Both results are then within an fp32 rounding or so of
    float64: at least as close as OpenCLIP's, up to one rounding of the result.
    """
    gen = torch.Generator().manual_seed(seed)
    n, d = 1024, 64
    img = torch.randint(-8, 9, (n, d), generator=gen).double() / 8  # norm ~4.9
    noise = torch.randint(-8, 9, (n, d), generator=gen).double() / 8
    txt = torch.where(torch.rand(n, d, generator=gen) < 0.3, noise, img)
    scale = torch.tensor(100.0)
    assert torch.equal((img.float() @ txt.float().T * 100).double(), img @ txt.T * 100)
    exact = reference.clip_loss_dense(img, txt, scale.double()).item()
    ours = ClipLoss(impl="torch")(img.float(), txt.float(), scale).item()
    theirs = open_clip_loss.ClipLoss()(img.float(), txt.float(), scale).item()
    rounding = torch.finfo(torch.float32).eps * exact
    assert abs(ours - exact) <= abs(theirs - exact) + rounding, (ours, theirs, exact)


def test_out_dtype_is_the_fp32_loss_cast_once(rng):
    """``out_dtype`` changes only the final cast: fp32 out of 16-bit inputs is the loss the
    16-bit call rounds, and the gradients are the same."""
    img, txt = _features(40, 16, torch.bfloat16, rng)
    scale = torch.tensor(30.0)
    fp32_out = lambda i, t, s: reference.clip_loss(i, t, s, out_dtype=torch.float32)
    # An upstream gradient exact in bf16, so that both backward passes see the same one.
    wide = _run(fp32_out, img, txt, scale, upstream=1.75)
    narrow = _run(reference.clip_loss, img, txt, scale, upstream=1.75)
    assert wide[0].dtype == torch.float32 and narrow[0].dtype == torch.bfloat16
    assert torch.equal(wide[0].to(torch.bfloat16), narrow[0])
    for a, b in zip(wide[1:], narrow[1:]):
        assert torch.equal(a, b)
    rows = reference.clip_loss_rows(img[:7], txt, scale, 5, out_dtype=torch.float64)
    assert rows.dtype == torch.float64


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda q, k, s: reference.clip_loss(q, k, s, out_dtype=torch.int32), "out_dtype"),
        (lambda q, k, s: reference.clip_loss(q, k, s, out_dtype="float32"), "out_dtype"),
        (lambda q, k, s: reference.clip_loss_rows(q, k, s, 3), "offset"),
        (lambda q, k, s: reference.clip_loss_rows(q, k, s, -1), "offset"),
        (lambda q, k, s: reference.clip_loss_rows(q[:2], k, s, 2.0), "offset"),
    ],
)
def test_bad_kernel_arguments_are_clear_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(4, 8), torch.randn(4, 8), torch.tensor(1.0))


def test_backward_keeps_no_logits(rng):
    """Saved tensors for backward are O(N*D + N): never the N x N logits."""
    n, d = 2048, 16
    img, txt = _features(n, d, torch.float32, rng)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ClipLoss()(img, txt, torch.tensor(10.0, requires_grad=True))
    budget = (2 * n * d + 2 * n + 1) * 4
    assert sum(saved) <= budget, f"saved {sum(saved)} bytes for backward, budget {budget}"
    loss.backward()


@pytest.mark.parametrize(
    "img, txt, scale, match",
    [
        (torch.randn(4), torch.randn(4), 1.0, "2-D"),
        (torch.randn(0, 4), torch.randn(0, 4), 1.0, "empty"),
        (torch.randn(4, 8), torch.randn(4, 9), 1.0, "same shape"),
        (torch.randn(4, 8), torch.randn(5, 8), 1.0, "same shape"),
        (torch.randint(0, 5, (4, 8)), torch.randint(0, 5, (4, 8)), 1.0, "floating point"),
        (torch.randn(4, 8), torch.randn(4, 8).double(), 1.0, "float64"),
        (torch.randn(4, 8), torch.randn(4, 8), torch.ones(2), "scalar"),
        (torch.randn(4, 8), torch.randn(4, 8), "1.0", "scalar"),
        (torch.randn(4, 8), torch.randn(4, 8, device="meta"), 1.0, "meta"),
    ],
)
def test_bad_input_is_a_clear_value_error(img, txt, scale, match):
    with pytest.raises(ValueError, match=match):
        ClipLoss()(img, txt, scale)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="impl"):
        ClipLoss(impl="cuda")
    with pytest.raises(ValueError, match="rank"):
        ClipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="triton"):
        ClipLoss(impl="triton")(torch.randn(3, 4), torch.randn(3, 4), 1.0)


def test_world_size_without_process_group_is_a_clear_error():
    with pytest.raises(RuntimeError, match="process group"):
        ClipLoss(rank=0, world_size=2)(torch.randn(3, 4), torch.randn(3, 4), 1.0)


def test_keys_without_gradient(rng):
    """Keys that take no gradient (gathered without grad) leave the other gradients exact."""
    q = torch.randn(9, 12, generator=rng, dtype=torch.float64, requires_grad=True)
    k = torch.randn(20, 12, generator=rng, dtype=torch.float64)
    s = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    reference.clip_loss_rows(q, k, s, 6, block=(4, 8)).backward()
    got = (q.grad.clone(), s.grad.clone())
    q.grad, s.grad = None, None
    torch.nn.functional.cross_entropy(s * q @ k.T, torch.arange(9) + 6).backward()
    assert torch.allclose(got[0], q.grad, atol=1e-12) and torch.allclose(got[1], s.grad, atol=1e-12)
    assert k.grad is None

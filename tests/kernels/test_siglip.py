"""The fused Triton SigLIP kernel against float64 math, under conditions a GPU creates.

On the CPU the kernel runs under the Triton interpreter in fp32, fp16 and bf16 (bf16 dots decoded,
tests/kernels/conftest.py); it plans for 4 concurrent programs, so at B, N >= 130 programs walk
several 64-row tiles, the passes cut the other axis into ranges, and D = 300 takes two D-chunks
(:func:`test_the_cpu_shapes_walk_several_tiles`). Regimes keep the sigmoids off saturation
(scale 10, bias -2; scale 30, bias -5) so every gradient carries signal, and gradient errors are
capped at a quarter of each gradient's largest entry: a kernel that drops a tile, a label or a
chunk fails. Grid order is permuted with tests/kernels/gpu_like.py. The `gpu` tests repeat this
on a GPU; the `slow` one builds every Hopper config for sm_90.
"""

import pytest
import torch

from declip_fast.kernels import siglip, tuning
from tests.kernels.gpu_like import ORDERS, program_order

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = ("loss", "d image", "d text", "d scale", "d bias")


def _pair(m, n, d, dtype, gen, offset, device=DEVICE):
    """Unit rows image [m, d], text [n, d]; with an offset, text offset + i leans towards image i
    (positives with large logits, as after some training)."""
    norm = torch.nn.functional.normalize
    a = norm(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=-1)
    b = norm(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)
    if offset is not None:
        b[offset : offset + m] += a
    return a.to(device=device, dtype=dtype), norm(b, dim=-1).to(device=device, dtype=dtype)


def _labels(m, n, offset, like):
    y = torch.full((m, n), -1.0, dtype=like.dtype, device=like.device)
    if offset is not None:
        i = torch.arange(m, device=like.device)
        y[i, i + offset] = 1.0
    return y


def _dense(offset):
    """The definition, in the inputs' dtype: (1/B) sum softplus(-y z) = -(1/B) sum logsigmoid(y z)."""

    def fn(a, b, s, bias):
        z = s * a @ b.T + bias
        return -torch.nn.functional.logsigmoid(_labels(a.shape[0], b.shape[0], offset, z) * z).sum() / a.shape[0]

    return fn


def _fused(offset, **kwargs):
    return lambda a, b, s, bias: siglip.siglip_loss(a, b, s, bias, offset, **kwargs)


def _grads(fn, a, b, s, bias, upstream=1.7):
    a, b, s, bias = (t.detach().clone().requires_grad_(True) for t in (a, b, s, bias))
    loss = fn(a, b, s, bias)
    (loss * upstream).backward()  # a non-unit upstream gradient
    return [loss.detach(), a.grad, b.grad, s.grad, bias.grad]


def _errors(got, exact):
    return [(g.double() - e.double()).abs().max().item() for g, e in zip(got, exact)]


# Relative slack per output on top of 2x PyTorch's own error, as in test_contrastive: the outputs
# are rounded to the input dtype once (half an epsilon of the largest entry) and 16-bit dz goes to
# the tensor cores rounded once more (another half); fp32: 4 epsilons (tf32x3 dots).
REL = {torch.float32: 4 * 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# The loss, d scale and d bias are sums over B x N terms, accumulated in fp32 per program over
# its tiles where PyTorch sums pairwise: 4 fp32 epsilons of the sum of the terms' absolute values.
SUM_REL = 4 * 2.0**-23


def _check(a, b, s, bias, offset, upstream=1.7, sensitive=True):
    """For every output: |fused - float64| <= 2 |PyTorch in a's dtype - float64| + REL max|float64|
    (+ SUM_REL of the absolute sum for the loss, d scale and d bias). ``sensitive``: the regime has
    gradients well above rounding (asserted), and each gradient's bound is capped at a quarter of
    its largest entry, so a zero gradient (or a quarter of it lost) cannot pass even where
    PyTorch's own 16-bit error is large."""
    a64, b64, s64, bias64 = a.double(), b.double(), s.double(), bias.double()
    exact = _grads(_dense(offset), a64, b64, s64, bias64, upstream)
    ours = _errors(_grads(_fused(offset), a, b, s, bias, upstream), exact)
    theirs = _errors(_grads(_dense(offset), a, b, s.to(a.dtype), bias.to(a.dtype), upstream), exact)
    dots = a64 @ b64.T
    y = _labels(a.shape[0], b.shape[0], offset, dots)
    dz = torch.sigmoid(s64 * dots + bias64) - (y > 0).double()
    sums = {"loss": exact[0].item(), "d scale": (dz * dots).abs().sum().item(), "d bias": dz.abs().sum().item()}
    for name, e, t, x in zip(NAMES, ours, theirs, exact):
        size = x.abs().max().item()
        bound = (
            2 * t
            + REL[a.dtype] * size
            + SUM_REL * sums.get(name, 0.0) * (1 if name == "loss" else upstream) / a.shape[0]
        )
        if sensitive and name != "loss":
            assert size > 1e-3, f"{name}: the regime's gradient {size:.3g} is too small to test"
            bound = min(bound, 0.25 * size)
        assert e <= bound, f"{name}: error {e:.3g} > {bound:.3g} (PyTorch's {t:.3g}, max {size:.3g})"


CASES = [  # (B, N, D, offset): diagonal, D = 3 / 100 / 300 (two chunks), no positives, gathered
    (200, 200, 3, 0),
    (200, 200, 100, 0),
    (130, 260, 300, None),
    (100, 300, 100, 200),
    (70, 350, 48, 140),
    (1, 1, 3, 0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, n, d, offset", CASES)
def test_matches_float64(b, n, d, offset, dtype, rng):
    a, t = _pair(b, n, d, dtype, rng, offset)
    _check(a, t, torch.tensor(10.0, device=DEVICE), torch.tensor(-2.0, device=DEVICE), offset, sensitive=b > 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale, bias", [(30.0, -5.0), (10.0, -10.0), (1.0, 0.5)])
def test_other_scales_and_biases(scale, bias, dtype, rng):
    """Confident logits (|z| up to ~30), SigLIP's initial (10, -10), and a flat start."""
    a, t = _pair(130, 260, 40, dtype, rng, 65)
    _check(a, t, torch.tensor(scale, device=DEVICE), torch.tensor(bias, device=DEVICE), 65)


def test_the_cpu_shapes_walk_several_tiles():
    """What the tests above rely on: in both passes programs walk several 64-row tiles, the other
    axis is cut into ranges wherever it has 128 rows or more, and D = 300 takes two chunks of the
    interpreter's BD."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter's plan")
    slots = tuning.concurrent_programs(torch.device("cpu"))
    for p, q in [(200, 200), (130, 260), (260, 130), (100, 300), (300, 100)]:
        splits = tuning.plan_splits(-(-p // siglip.PLAN_TILE), -(-q // siglip.PLAN_TILE), slots, siglip.MAX_SPLITS)
        tiles = -(-q // 64)  # the interpreter's BQ
        longest_walk = -(-tiles // splits)
        assert longest_walk >= 2 and (splits >= 2 or q < 128), (p, q, splits)
    assert 100 < 300 // 2 < siglip.INTERPRETER["any"][0][0]["BD"] < 300


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, n, d, offset", [(200, 200, 72, 0), (130, 260, 300, None), (100, 300, 72, 200)])
def test_bit_identical_in_any_program_order(b, n, d, offset, dtype, rng):
    """Loss and every gradient give the same bits whatever order the programs run in: no
    atomics, no program reading what another wrote."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter's program order")
    a, t = _pair(b, n, d, dtype, rng, offset)
    s, bias = torch.tensor(10.0), torch.tensor(-2.0)
    results = {}
    for order in ORDERS:
        with program_order(order, seed=7) as launches:
            results[order] = _grads(_fused(offset), a, t, s, bias)
        assert launches["count"] == 2  # the row and column passes ran permuted
    for order in ORDERS[1:]:
        for name, x, y in zip(NAMES, results["natural"], results[order]):
            assert torch.equal(x, y), f"{order}: {name} differs"


def test_fp16_small_sigmoids_stay_normal(rng):
    """fp16 under GradScaler (upstream 65536, fp32 loss), no positives (a chunk of another rank's
    texts) and bias -14: every sigmoid is ~1e-6, subnormal in fp16, and the gradients are made of
    them alone. dz scaled by 2^14 before its 16-bit copy keeps them normal: each row's gradient is
    within 2 fp16 epsilons of float64 (median over rows); unscaled, the subnormals' spacing
    (6e-8, ~5% of each value) shows."""
    a, t = _pair(256, 256, 64, torch.float16, rng, None)
    s, bias = torch.tensor(5.0, device=DEVICE), torch.tensor(-14.0, device=DEVICE)
    exact = _grads(_dense(None), a.double(), t.double(), s.double(), bias.double(), 65536.0)
    got = _grads(_fused(None, out_dtype=torch.float32), a, t, s, bias, 65536.0)
    for name, g, e in zip(NAMES[1:3], got[1:3], exact[1:3]):
        per_row = (g.double() - e).norm(dim=1) / e.norm(dim=1)
        assert per_row.median() <= 2 * 2.0**-10, (name, per_row.median().item())


# ----------------------------------------------------------------------------- the interface


def _bad_inputs():
    a, t = torch.randn(4, 8), torch.randn(6, 8)
    s = torch.tensor(10.0)
    yield (a.double(), t.double(), s, s, 0), "fp16, bf16 or fp32"
    yield (a, t.half(), s, s, 0), "fp16, bf16 or fp32"
    yield (a[0], t, s, s, 0), r"\[B, D\]"
    yield (a, t[:, :5], s, s, 0), r"\[B, D\]"
    yield (a[:0], t, s, s, 0), "non-empty"
    yield (a, t.to("meta"), s, s, 0), "one CUDA device"
    yield (a, t, torch.ones(2), s, 0), "scalars"
    for offset in (-1, 3, 1.0, True):
        yield (a, t, s, s, offset), "offset"


@pytest.mark.parametrize("args, message", list(_bad_inputs()))
def test_bad_inputs_raise_one_value_error(args, message):
    with pytest.raises(ValueError, match=message):
        siglip.siglip_loss(*args)


def test_offset_range_ends(rng):
    a, t = _pair(10, 30, 8, torch.float32, rng, None)
    s = torch.tensor(10.0, device=DEVICE)
    for offset in (0, 20, None):
        siglip.siglip_loss(a, t, s, s, offset)


def test_out_dtype_returns_the_unrounded_loss(rng):
    a, t = _pair(70, 70, 32, torch.bfloat16, rng, 0)
    s, bias = torch.tensor(10.0, device=DEVICE), torch.tensor(-2.0, device=DEVICE)
    exact = _dense(0)(a.double(), t.double(), s.double(), bias.double()).item()
    wide = siglip.siglip_loss(a, t, s, bias, out_dtype=torch.float32)
    narrow = siglip.siglip_loss(a, t, s, bias)
    assert wide.dtype == torch.float32 and narrow.dtype == torch.bfloat16 and wide.dim() == 0
    assert wide.to(torch.bfloat16) == narrow
    assert abs(wide.item() - exact) <= 1e-5 * exact < abs(narrow.item() - exact)


def test_any_layout_of_the_inputs(rng):
    """Column-major features give the same bits as contiguous ones."""
    a, t = _pair(90, 90, 24, torch.float32, rng, 0)
    s, bias = torch.tensor(10.0, device=DEVICE), torch.tensor(-2.0, device=DEVICE)
    flipped = [x.T.contiguous().T for x in (a, t)]
    assert flipped[0].stride(1) != 1
    for x, y in zip(_grads(_fused(0), a, t, s, bias), _grads(_fused(0), *flipped, s, bias)):
        assert torch.equal(x, y)


def test_launches_only_what_the_gradients_need(rng, monkeypatch):
    """Every launch enters the inputs' device; the column pass (loss, d text) always runs, the
    row pass only for d image, d scale or d bias, and nothing but the loss without gradients."""
    seen = []
    real = siglip.launch_device
    monkeypatch.setattr(siglip, "launch_device", lambda dev: seen.append(dev) or real(dev))
    a, t = _pair(40, 40, 8, torch.float32, rng, 0)
    s, bias = torch.tensor(10.0, device=DEVICE), torch.tensor(-2.0, device=DEVICE)
    full = _grads(_fused(0), a, t, s, bias)
    assert seen == [a.device] * 2
    for needs, launches in [((0, 0, 0, 0), 1), ((0, 0, 1, 1), 2), ((0, 1, 0, 0), 1), ((1, 0, 0, 0), 2)]:
        seen.clear()
        inputs = [x.detach().clone().requires_grad_(bool(n)) for x, n in zip((a, t, s, bias), needs)]
        loss = siglip.siglip_loss(*inputs)
        assert len(seen) == launches, needs
        # The loss-only pass may autotune to other tiles on a GPU (another summation order).
        assert torch.equal(loss, full[0]) or DEVICE == "cuda" and torch.allclose(loss, full[0], rtol=1e-5)
        if any(needs):
            loss.backward()
            for x, n, want in zip(inputs, needs, full[1:]):
                assert (x.grad is not None) == bool(n)
                assert x.grad is None or torch.equal(x.grad * 1.7, want)
    seen.clear()
    with torch.no_grad():
        siglip.siglip_loss(*(x.detach().clone().requires_grad_(True) for x in (a, t, s, bias)))
    assert len(seen) == 1


# ----------------------------------------------------------------------------- sm_90 and GPU


SM90_SHAPES = [(32768, 32768, 512), (128, 32768, 1000), (4096, 4096, 64)]  # D % 16 == 0, not, small


@pytest.mark.slow
def test_every_hopper_config_builds_clean_as_launched():
    """Every Hopper config of the three launches (row pass, column pass, loss only), specialised
    as a launch with contiguous inputs is: no spills, at most MAX_REGISTERS, wgmma for 16 bits."""
    from benchmarks.sm90 import hopper_problems
    from benchmarks.sm90_siglip import siglip_specs

    specs = [s for dt in ("bfloat16", "float16", "float32") for shape in SM90_SHAPES for s in siglip_specs(*shape, dt)]
    assert {s["launch"] for s in specs} == {"rows", "columns", "loss", "scalars"}
    problems = hopper_problems(specs)
    assert not problems, "\n".join(problems)


GPU_CASES = [
    (b, n, d, offset, dtype)
    for dtype in (torch.bfloat16, torch.float16, torch.float32)
    for b, n, d, offset in [(4099, 4099, 1000, 0), (128, 4096, 512, 384), (2048, 6144, 768, None)]
]


@pytest.mark.gpu
@pytest.mark.parametrize("b, n, d, offset, dtype", GPU_CASES)
def test_gpu_matches_float64(b, n, d, offset, dtype, rng):
    a, t = _pair(b, n, d, dtype, rng, offset)
    _check(a, t, torch.tensor(10.0, device=DEVICE), torch.tensor(-2.0, device=DEVICE), offset)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_runs_are_bit_identical(dtype, rng):
    a, t = _pair(128, 20000, 512, dtype, rng, 640)
    s, bias = torch.tensor(10.0, device=DEVICE), torch.tensor(-2.0, device=DEVICE)
    first, second = _grads(_fused(640), a, t, s, bias), _grads(_fused(640), a, t, s, bias)
    assert all(torch.equal(x, y) for x, y in zip(first, second))

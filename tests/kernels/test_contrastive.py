"""The fused Triton contrastive kernels against float64 math, under conditions a GPU creates.

On the CPU the kernels run under the Triton interpreter, in fp32, fp16 and bf16 (bf16 dots decoded,
tests/kernels/conftest.py). The interpreter plans for 4 concurrent programs, so at N >= 257 forward
programs walk several tiles, the backward cuts its reduction axis into ranges, and D = 640 takes
several D-chunks; :func:`test_the_cpu_shapes_walk_several_tiles` holds that true. Grid order is
permuted with tests/kernels/gpu_like.py. Gradient checks use regimes where the gradients are not
near zero (scale 14 and 30, uncorrelated and hard-negative features), with errors bounded relative
to each gradient's largest entry, so a kernel that returns zeros or drops a tile's update fails.
The `gpu` tests repeat this on a GPU up to N = 65536.
"""

import pytest
import torch

from declip_fast.kernels import contrastive, reference, tuning
from tests.kernels.gpu_like import ORDERS, program_order

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KINDS = ["correlated", "uncorrelated", "hard"]


def _pair(m, n, d, dtype, gen, kind="correlated", device=DEVICE):
    """Unit rows a [m, d], b [n, d]. correlated: b_i leans towards a_i (a loss that is not
    flat); uncorrelated: independent; hard: b_i is a_i blended with a_{i+1}, so each row has a
    near-duplicate negative next to its positive."""
    norm = torch.nn.functional.normalize
    a = norm(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=-1)
    b = norm(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)
    k = min(m, n)
    if kind == "correlated":
        b[:k] += 0.5 * a[:k]
    elif kind == "hard":
        b[:k] = a[:k] + 0.8 * a.roll(-1, dims=0)[:k] + 0.3 * b[:k]
    return a.to(device=device, dtype=dtype), norm(b, dim=-1).to(device=device, dtype=dtype)


def _grads(fn, a, b, scale, upstream=1.7):
    a, b, scale = (t.detach().clone().requires_grad_(True) for t in (a, b, scale))
    loss = fn(a, b, scale)
    (loss * upstream).backward()  # a non-unit upstream gradient
    return [loss.detach(), a.grad, b.grad, scale.grad]


def _errors(got, exact):
    return [(g.double() - e.double()).abs().max().item() for g, e in zip(got, exact)]


def _rows_dense(offset):
    def fn(q, k, s):
        labels = torch.arange(q.shape[0], device=q.device) + offset
        return torch.nn.functional.cross_entropy(s * q @ k.T, labels)

    return fn


# Relative slack per output on top of 2x PyTorch's own error: the outputs are rounded to the
# input dtype once (half an epsilon of the largest entry), and 16-bit dX goes to the tensor cores
# rounded once more (another half). fp32: 4 fp32 epsilons, for the one rounding of s*log2(e) that
# scales every logit by (1 + eps) in the kernel's base-2 arithmetic.
REL = {torch.float32: 4 * 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# The loss is a difference of log-sum-exps and positives of the size of the largest logit: one
# fp32 epsilon of that size on top (the base-2 logits round at a different place than PyTorch's).
LOSS_REL = 2.0**-23
# The gradients use P = exp(X - lse) with X recomputed tile by tile, in another summation order
# than the X the forward's statistics came from (PyTorch computes X once and shares it). Each
# logit carries one fp32 rounding of its own size, unit roundoff 2^-24 times the largest |X|,
# in the statistics and again in the recomputed P: so each P entry, and the gradient sums built
# from them, moves by up to 2 * 2^-24 * max|X| relative. How much of that shows depends on the
# CPU's BLAS (measured: 1x..4x PyTorch's own error on two x86 machines).
RECOMPUTE_REL = 2 * 2.0**-24


def _check(fused, dense, a, b, scale, exact_fn=None, sensitive=False, upstream=1.7):
    """For every output: |fused - float64| <= 2 * |PyTorch in a's dtype - float64| + REL * max|float64|
    (plus, for the loss and d scale, one epsilon of their sums; for d a and d b, the recomputed
    logits' rounding, ``RECOMPUTE_REL``).

    The float64 answer is computed from the same (rounded) inputs, by ``exact_fn`` (default
    ``dense``; large GPU cases pass the tiled reference). ``sensitive``: the regime has gradients
    well above rounding, and the bound is capped at a quarter of each gradient's largest entry,
    so that a zero gradient (or a quarter of it lost) cannot pass even where PyTorch's own 16-bit
    error is large.
    """
    exact = _grads(exact_fn or dense, a.double(), b.double(), scale.double(), upstream)
    ours = _errors(_grads(fused, a, b, scale, upstream), exact)
    torch_err = _errors(_grads(dense, a, b, scale.to(a.dtype), upstream), exact)
    norms = a.double().norm(dim=1).max().item() * b.double().norm(dim=1).max().item()
    # d scale = sum(dX * a.b) over N^2 terms whose absolute values sum to <= 2 * upstream * norms:
    # one fp32 epsilon of that, as for the loss one epsilon of the largest logit.
    sums = {"loss": scale.item() * norms, "d scale": upstream * norms}
    for name, e, t, x in zip(("loss", "d a", "d b", "d scale"), ours, torch_err, exact):
        size = x.abs().max().item()
        bound = 2 * t + REL[a.dtype] * size + LOSS_REL * sums.get(name, 0.0)
        if name in ("d a", "d b"):
            bound += RECOMPUTE_REL * scale.item() * norms * size
        if sensitive and name != "loss":
            bound = min(bound, 0.25 * size)
        assert e <= bound, f"{name}: error {e:.3g} > {bound:.3g} (PyTorch's {t:.3g}, max {size:.3g})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [3, 100, 640])
@pytest.mark.parametrize("n", [1, 33, 257])
def test_symmetric_matches_float64(n, d, dtype, rng):
    a, b = _pair(n, n, d, dtype, rng)
    scale = torch.tensor(float(torch.empty(()).uniform_(5, 100, generator=rng)), device=DEVICE)
    _check(contrastive.clip_loss, reference.clip_loss_dense, a, b, scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, offset", [(7, 130, 0), (33, 99, 66), (65, 130, 65), (130, 300, 170)])
def test_rows_matches_float64(m, n, offset, dtype, rng):
    a, b = _pair(m, n, 48, dtype, rng)
    scale = torch.tensor(14.0, device=DEVICE)
    fused = lambda q, k, s: contrastive.clip_loss_rows(q, k, s, offset)
    _check(fused, _rows_dense(offset), a, b, scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["uncorrelated", "hard"])
@pytest.mark.parametrize("scale", [14.0, 30.0])
def test_gradients_where_they_are_not_small(scale, kind, dtype, rng):
    """Regimes where every output carries signal: a zero-gradient or lost-update kernel fails."""
    a, b = _pair(300, 300, 40, dtype, rng, kind)
    _check(contrastive.clip_loss, reference.clip_loss_dense, a, b, torch.tensor(scale, device=DEVICE), sensitive=True)


def test_the_cpu_shapes_walk_several_tiles():
    """What the tests above rely on: at N = 257 and 300 the interpreter's plan gives forward
    programs several 64-row tiles in both directions, the backward several ranges, and D = 640
    several chunks of the interpreter's BD."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter's plan")
    slots = tuning.concurrent_programs(torch.device("cpu"))
    for n in (257, 300):
        tiles = -(-n // contrastive.PLAN_TILE)
        p_r, p_c = tuning.plan_rectangles(tiles, tiles, slots, contrastive.MAX_PROGRAMS_PER_AXIS)
        blocks = -(-n // 64)  # the interpreter's BM = BN
        assert blocks // p_r >= 2 and blocks // p_c >= 2 or max(blocks // p_r, blocks // p_c) >= 5
        assert tuning.plan_splits(tiles, tiles, slots, contrastive.MAX_SPLITS) >= 2
    assert 640 > contrastive.INTERPRETER_BWD["any"][0][0]["BD"]


# ----------------------------------------------------------------------------- program order


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _mode_fn(mode):
    if mode == "symmetric":
        return (300, 300, 0), contrastive.clip_loss
    if mode == "rows":
        return (130, 300, 170), lambda q, k, s: contrastive.clip_loss_rows(q, k, s, 170)
    # One rank's share of a 3-rank batch: 100 local rows, 300 gathered columns, offset 100.
    return (100, 300, 100), lambda q, k, s: contrastive.clip_loss_gathered(q, k, s, 100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["symmetric", "rows", "gathered"])
def test_bit_identical_in_any_program_order(mode, dtype, rng, one_rank_group):
    """Forward and backward give the same bits whatever order the programs run in: no atomics,
    no program reading what another wrote."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter's program order")
    (m, n, _), fn = _mode_fn(mode)
    a, b = _pair(m, n, 72, dtype, rng, "hard")
    scale = torch.tensor(20.0)
    results = {}
    for order in ORDERS:
        with program_order(order, seed=7) as launches:
            results[order] = _grads(fn, a, b, scale)
        assert launches["count"] >= 3  # the forward and both backward passes ran permuted
    for order in ORDERS[1:]:
        for name, x, y in zip(("loss", "d a", "d b", "d scale"), results["natural"], results[order]):
            assert torch.equal(x, y), f"{mode} {order}: {name} differs"


# ----------------------------------------------------------------------------- numerics and input checks


def test_fp16_small_probabilities_stay_normal(rng):
    """fp16 training under GradScaler (upstream gradient 65536, fp32 loss): at scale 20 with
    near-duplicate pairs the negatives' probabilities are 1e-10..1e-7, below fp16's subnormal
    range, and the rows' gradients are made of them. The upstream scale cannot help (it is
    applied after the 16-bit dot); dX scaled by 2^14 before its 16-bit copy keeps them. Each
    row's gradient is then within 2 fp16 epsilons of float64 (median over rows; one rounding of
    dX and one of the output), 1.4e-3 measured; unscaled, 4.8e-3."""
    a, _ = _pair(512, 512, 64, torch.float16, rng, "uncorrelated")
    noise = torch.randn(512, 64, generator=rng, dtype=torch.float64).to(DEVICE)
    b = torch.nn.functional.normalize(a.double() + 0.05 * noise, dim=-1).to(torch.float16)
    scale = torch.tensor(20.0, device=DEVICE)
    fused = lambda q, k, s: contrastive.clip_loss(q, k, s, out_dtype=torch.float32)
    exact = _grads(reference.clip_loss_dense, a.double(), b.double(), scale.double(), 65536.0)
    got = _grads(fused, a, b, scale, 65536.0)
    for name, g, e in zip(("d a", "d b"), got[1:3], exact[1:3]):
        per_row = (g.double() - e).norm(dim=1) / e.norm(dim=1)
        assert per_row.median() <= 2 * 2.0**-10, (name, per_row.median().item())


def test_offset_must_leave_room_for_the_positives(rng):
    a, b = _pair(10, 30, 8, torch.float32, rng)
    s = torch.tensor(10.0, device=DEVICE)
    for offset in (-1, 21, 40):
        with pytest.raises(ValueError, match="offset"):
            contrastive.clip_loss_rows(a, b, s, offset)
    contrastive.clip_loss_rows(a, b, s, 20)  # the last offset with every positive in range


def test_out_dtype_returns_the_unrounded_loss(rng):
    a, b = _pair(70, 70, 32, torch.bfloat16, rng, "uncorrelated")
    s = torch.tensor(14.0, device=DEVICE)
    exact = reference.clip_loss_dense(a.double(), b.double(), s.double()).item()
    wide = contrastive.clip_loss(a, b, s, out_dtype=torch.float32)
    narrow = contrastive.clip_loss(a, b, s)
    assert wide.dtype == torch.float32 and narrow.dtype == torch.bfloat16
    assert wide.to(torch.bfloat16) == narrow
    assert abs(wide.item() - exact) <= 1e-5 * exact < abs(narrow.item() - exact)


def test_any_layout_of_the_inputs(rng):
    """Column-major features (stride 1 along the rows) give the same results as contiguous ones."""
    a, b = _pair(90, 90, 24, torch.float32, rng)
    s = torch.tensor(14.0, device=DEVICE)
    flipped = [t.T.contiguous().T for t in (a, b)]
    assert flipped[0].stride(1) != 1
    for x, y in zip(_grads(contrastive.clip_loss, a, b, s), _grads(contrastive.clip_loss, *flipped, s)):
        assert torch.equal(x, y)


def test_launches_run_on_the_inputs_device(rng, monkeypatch):
    """Triton launches on the current CUDA device: every launch enters the inputs' device."""
    seen = []
    real = contrastive.launch_device
    monkeypatch.setattr(contrastive, "launch_device", lambda dev: seen.append(dev) or real(dev))
    a, b = _pair(40, 40, 8, torch.float32, rng)
    _grads(contrastive.clip_loss, a, b, torch.tensor(10.0, device=DEVICE))
    assert seen == [a.device] * 3  # forward, row pass, column pass
    guard = tuning.launch_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@pytest.mark.parametrize("n, d", [(131072, 512), (131072, 1024), (65536, 2048), (8192, 512)])
def test_memory_and_waves_at_scale(n, d):
    """On a 132-SM H100 up to N = 131072: the forward's rectangles keep >= 90% of the SMs busy
    by the plan's own estimate, and its partial statistics stay under 64 MiB (the backward needs
    only the O(N) statistics beyond inputs and gradients); the gathered mode (128 rows a rank)
    cuts the column axis into several ranges whose fp32 partials fit SPLIT_WORKSPACE_BYTES."""
    sms, t = 132, -(-n // contrastive.PLAN_TILE)
    p_r, p_c = tuning.plan_rectangles(t, t, sms, contrastive.MAX_PROGRAMS_PER_AXIS)
    waves, work = -(-p_r * p_c // sms), -(-t // p_r) * -(-t // p_c)
    assert t * t / (waves * work * sms) >= 0.9, (p_r, p_c)
    assert (p_r + p_c) * n * 2 * 4 + n * 4 < 64 << 20
    splits = tuning.plan_splits(1, t, sms, contrastive.MAX_SPLITS)
    assert splits >= 8 and splits * 128 * d * 4 <= contrastive.SPLIT_WORKSPACE_BYTES


# ----------------------------------------------------------------------------- GPU


# Both gradient-sensitive regimes at the small sizes, one at the large (the same-dtype dense
# comparison stores several N x N matrices: 65536 fits in 16 bits).
GPU_CASES = [
    (n, d, dtype, kind)
    for dtype in (torch.bfloat16, torch.float16, torch.float32)
    for n, d in [(1, 3), (257, 640), (4099, 1000)]
    for kind in ("uncorrelated", "hard")
] + [
    (16384, 2048, torch.bfloat16, "hard"),
    (16384, 2048, torch.float16, "uncorrelated"),
    (16384, 2048, torch.float32, "hard"),
    (65536, 512, torch.bfloat16, "uncorrelated"),
    (65536, 512, torch.float16, "hard"),
    (32768, 512, torch.float32, "uncorrelated"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("n, d, dtype, kind", GPU_CASES)
def test_gpu_symmetric_matches_float64(n, d, dtype, kind, rng):
    a, b = _pair(n, n, d, dtype, rng, kind)
    scale = torch.tensor(14.0 if kind == "uncorrelated" else 30.0, device=DEVICE)
    _check(contrastive.clip_loss, reference.clip_loss_dense, a, b, scale, reference.clip_loss, sensitive=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_runs_are_bit_identical(dtype, rng):
    a, b = _pair(20000, 20000, 512, dtype, rng, "hard")
    s = torch.tensor(30.0, device=DEVICE)
    first, second = _grads(contrastive.clip_loss, a, b, s), _grads(contrastive.clip_loss, a, b, s)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_autotune_trials_leave_no_stale_scale_partials(monkeypatch, rng):
    """The backward's d-scale slots depend on the config's BP. Autotuning runs every config on the
    real buffers first: a BP=32 trial writes twice the slots of the BP=64 config that wins, and
    the winner's launch must not add the trial's leftovers (a wrong d scale at the first step of
    every new shape on a GPU). The interpreter autotunes nothing (one config), so two configs and
    a benchmark clock that prefers the later one are put in here."""
    import triton

    kernel = contrastive._bwd_kernel
    base = dict(BQ=64, BK=128, BD=64)
    configs = [triton.Config(dict(base, BP=bp), num_warps=4, num_stages=1) for bp in (32, 64)]
    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "early_config_prune", lambda cfgs, nargs, **kw: cfgs)
    monkeypatch.setattr(kernel, "cache", {})
    clock = iter([2.0, 1.0] * 8)  # the first config tried is the slower one

    def fake_bench(kernel_call, quantiles):
        kernel_call()  # a trial launch, as do_bench makes: it writes the buffers
        t = next(clock)
        return [t, t, t]

    monkeypatch.setitem(kernel.__dict__, "do_bench", fake_bench)
    a, b = _pair(200, 200, 64, torch.float32, rng)
    scale = torch.tensor(20.0, device=DEVICE, requires_grad=True)
    contrastive.clip_loss(a, b, scale).backward()
    assert {k: v.kwargs["BP"] for k, v in kernel.cache.items()} and all(
        c.kwargs["BP"] == 64 for c in kernel.cache.values()
    ), "the benchmark clock should have picked BP=64"
    exact = scale.detach().double().requires_grad_()
    reference.clip_loss_dense(a.double(), b.double(), exact).backward()
    assert scale.grad.item() == pytest.approx(exact.grad.item(), rel=1e-5, abs=1e-6)

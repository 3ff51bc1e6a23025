"""The fused Triton contrastive kernels against float64 math.

On the CPU the kernels run under the Triton interpreter (fp32 and fp16; the interpreter's bf16 is
wrong upstream). Every Hopper autotune config is compiled for sm_90 and must not spill. The `gpu`
tests repeat the comparison on a GPU in bf16/fp16/fp32 up to N = 65536.
"""

import pytest
import torch

from declip_fast.kernels import contrastive, reference, tuning
from tests.sm90 import hopper_problems

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pair(m, n, d, dtype, gen, device=DEVICE):
    a = torch.nn.functional.normalize(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)
    b[: min(m, n)] += 0.5 * a[: min(m, n)]  # correlated pairs: a loss that is not flat
    b = torch.nn.functional.normalize(b, dim=-1)
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


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


# Extra absolute slack per dtype on top of 2x PyTorch's own error: the loss and gradients are
# returned in the input dtype, so one rounding of a value of size ~10 (fp16: 2^-11 relative).
ATOL = {torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 8e-2}


def _check(fused, dense, a, b, scale, exact_fn=None):
    """|fused - float64| <= 2 * |PyTorch in the same dtype - float64| + atol + rtol * |float64|,
    for every output. rtol = 4 eps: the kernel works in base 2, and the one rounding of
    s * log2(e) scales every logit by (1 + eps), which moves every output by ~eps relative.

    ``exact_fn`` (default: ``dense``) computes the float64 answer; large GPU cases pass the tiled
    reference, whose float64 logits never exist in full.
    """
    exact = _grads(exact_fn or dense, a.double(), b.double(), scale.double())
    ours = _errors(_grads(fused, a, b, scale), exact)
    torch_err = _errors(_grads(dense, a, b, scale.to(a.dtype)), exact)
    rtol = 4 * torch.finfo(torch.float32).eps
    for name, e, t, x in zip(("loss", "d a", "d b", "d scale"), ours, torch_err, exact):
        bound = 2 * t + ATOL[a.dtype] + rtol * x.abs().max().item()
        assert e <= bound, f"{name}: error {e:.3g} > {bound:.3g} (PyTorch's {t:.3g})"


CPU_DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("d", [3, 100, 640])
@pytest.mark.parametrize("n", [1, 33, 257])
def test_symmetric_matches_float64(n, d, dtype, rng):
    a, b = _pair(n, n, d, dtype, rng)
    scale = torch.tensor(float(torch.empty(()).uniform_(5, 100, generator=rng)), device=DEVICE)
    _check(contrastive.clip_loss, reference.clip_loss_dense, a, b, scale)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m, n, offset", [(7, 130, 0), (33, 99, 66), (65, 130, 65)])
def test_rows_matches_float64(m, n, offset, dtype, rng):
    a, b = _pair(m, n, 48, dtype, rng)
    scale = torch.tensor(14.0, device=DEVICE)
    fused = lambda q, k, s: contrastive.clip_loss_rows(q, k, s, offset)
    _check(fused, _rows_dense(offset), a, b, scale)


def test_scale_100_is_finite_and_keys_without_grad(rng):
    """s = 100 with near-duplicate rows (logits up to 100 apart) and a key side with no grad."""
    a, b = _pair(40, 40, 16, torch.float32, rng)
    b[5] = a[9]
    q = a.clone().requires_grad_(True)
    s = torch.tensor(100.0, device=DEVICE, requires_grad=True)
    contrastive.clip_loss(q, b, s).backward()
    exact = reference.clip_loss_dense(a.double(), b.double(), torch.tensor(100.0, dtype=torch.float64, device=DEVICE))
    assert torch.isfinite(q.grad).all() and torch.isfinite(s.grad)
    assert abs(contrastive.clip_loss(a, b, s).item() - exact.item()) < 1e-4


def test_fp16_gradients_do_not_underflow_at_large_n(rng):
    """At N = 1024 the logit gradients are ~p / 2N ~ 5e-7, subnormal in fp16; the kernel keeps
    them relative to the positives' weight for the tensor cores, so the feature gradients are
    within one fp16 epsilon of the largest one (their own final rounding is half of that; with
    the gradients underflowing it is ~2 epsilons, and PyTorch's fp16 is ~1)."""
    a, b = _pair(1024, 1024, 8, torch.float16, rng)
    scale = torch.tensor(4.0, device=DEVICE)
    exact = _grads(reference.clip_loss_dense, a.double(), b.double(), scale.double())
    errors = _errors(_grads(contrastive.clip_loss, a, b, scale), exact)
    for name, e, x in zip(("d a", "d b"), errors[1:3], exact[1:3]):
        assert e <= torch.finfo(torch.float16).eps * x.abs().max().item(), name


@pytest.mark.parametrize("mode", ["symmetric", "rows"])
def test_windowed_backward_matches_float64(mode, rng, monkeypatch):
    """A workspace budget far below the problem forces several row and column windows (odd
    sizes, a partial last window, positives crossing window edges); results must not change."""
    m, n, d, offset = (200, 200, 40, 0) if mode == "symmetric" else (150, 330, 40, 100)
    monkeypatch.setattr(contrastive, "WORKSPACE_BYTES", 4 * d * 200)
    monkeypatch.setattr(contrastive, "MIN_WINDOW", 48)
    rows, cols = contrastive.plan_windows(m, n, d, torch.float16, True)
    assert rows < m and cols < n, (rows, cols)
    a, b = _pair(m, n, d, torch.float16, rng)
    scale = torch.tensor(30.0, device=DEVICE)
    if mode == "symmetric":
        _check(contrastive.clip_loss, reference.clip_loss_dense, a, b, scale)
    else:
        fused = lambda q, k, s: contrastive.clip_loss_rows(q, k, s, offset)
        _check(fused, _rows_dense(offset), a, b, scale)


@pytest.mark.parametrize("n, d", [(131072, 512), (131072, 1024), (65536, 2048), (8192, 512)])
def test_backward_workspace_stays_in_budget(n, d):
    """The issue's memory bound: up to N = 131072 the loss needs < 64 MiB beyond inputs and
    gradients. Forward: (P_r + P_c) x N (max, sum) partials; backward: the saved statistics and
    the fp32 windows of plan_windows."""
    rows, cols = contrastive.plan_windows(n, n, d, torch.bfloat16, True)
    p_r, p_c = contrastive._grid_dims(n, n)
    forward = (p_r + p_c) * n * 2 * 4 + n * 4
    backward = 4 * n * 4 + (rows + cols) * d * 4
    assert (rows + cols) * d * 4 <= contrastive.WORKSPACE_BYTES
    assert max(forward, backward) < 64 << 20, (forward, backward)


@pytest.mark.parametrize("n, d", [(1 << 20, 512), (262144, 4096), (1000, 64)])
def test_huge_problems_cap_the_roundings(n, d):
    rows, cols = contrastive.plan_windows(n, n, d, torch.bfloat16, True)
    assert -(-n // rows) <= contrastive.MAX_ROUNDINGS and 0 < cols <= n
    assert contrastive.plan_windows(n, n, d, torch.float32, True) == (n, n)


# ----------------------------------------------------------------------------- sm_90 builds

_T = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
_FWD_ARGS = dict(
    scale_ptr="*fp32", row_m_ptr="*fp32", row_l_ptr="*fp32", col_m_ptr="*fp32",
    col_l_ptr="*fp32", pos_ptr="*fp32", M="i32", N="i32", D="i32", offset="i32",
    M_BUCKET="i32", N_BUCKET="i32", stride_am="i32", stride_ad="i32", stride_bn="i32",
    stride_bd="i32",
)
_BWD_ARGS = dict(
    scale_ptr="*fp32", mult_ptr="*fp32", row_m_ptr="*fp32", row_l_ptr="*fp32", col_m_ptr="*fp32",
    col_l_ptr="*fp32", da_ptr="*fp32", db_ptr="*fp32",
    ds_ptr="*fp32", M="i32", N="i32", D="i32", offset="i32", M_BUCKET="i32", N_BUCKET="i32",
    w_row="fp32", w_col="fp32", stride_am="i32", stride_ad="i32",
    stride_bn="i32", stride_bd="i32",
)


def _specs():
    specs = []
    for dtype in _T:
        precision = tuning.dot_precision(dtype)
        for kernel, args, configs, flags in (
            ("_fwd_kernel", _FWD_ARGS, contrastive.HOPPER_FWD, dict(SYMMETRIC=True)),
            ("_bwd_kernel", _BWD_ARGS, contrastive.HOPPER_BWD, dict(SYMMETRIC=True, WANT_DB=True)),
        ):
            configs = configs[tuning.input_class(dtype)]
            for meta, opts in configs:
                consts = dict(PRECISION=precision, **flags, **meta)
                signature = dict(a_ptr=_T[dtype], b_ptr=_T[dtype], **args, **{k: "constexpr" for k in consts})
                specs.append(dict(module="declip_fast.kernels.contrastive", kernel=kernel,
                                  signature=signature, constexprs=consts, **opts))
    return specs


@pytest.mark.slow
def test_every_hopper_config_compiles_without_spills():
    problems = hopper_problems(_specs(), "a_ptr")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- GPU


GPU_CASES = [
    (n, d, dtype)
    for dtype in (torch.bfloat16, torch.float16, torch.float32)
    for n, d in [(1, 3), (257, 640), (4099, 1000), (16384, 2048)]
] + [
    # The dense same-dtype comparison stores several N x N matrices: 65536 fits in 16 bits.
    (65536, 512, torch.bfloat16), (65536, 512, torch.float16), (32768, 512, torch.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("n, d, dtype", GPU_CASES)
def test_gpu_symmetric_matches_float64(n, d, dtype, rng):
    a, b = _pair(n, n, d, dtype, rng)
    scale = torch.tensor(100.0, device=DEVICE)
    _check(contrastive.clip_loss, reference.clip_loss_dense, a, b, scale, reference.clip_loss)

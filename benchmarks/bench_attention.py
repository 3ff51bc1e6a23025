"""The two attention backends on a GPU (skipped elsewhere): bf16, forward and forward + backward.

Shapes are the towers': ViT-B/16 (B 256, 12 heads, L 197, head dim 64, bidirectional) and the
text tower (B 256, 8 heads, L 77, head dim 64, causal). q, k and v are the BSHD views of one fused
``[B, L, 3, H, D]`` qkv buffer, exactly what ``Attention.forward`` hands to ``attention()``, so
the layouts (and any copies a backend makes of them) are the ones training pays for.

Per backend (``xformers`` when it imports and runs, ``sdpa`` always): median time, achieved
TFLOP/s and the fraction of the bf16 matrix-product rate measured in the same run (torch.mm on
8192^3). FLOPs are counted the way FlashAttention's benchmarks count them: 4 B H L^2 Dh for the
forward, halved when causal; the backward is 2.5x the forward (five L x L matmuls against the
forward's two, the recomputed QK^T included), so forward + backward is 3.5x the forward. (The
issue said "2.5x for fwd+bwd"; that is the backward alone, and would understate fwd+bwd rates.)

A second table says which backend ``resolve_backend("auto", q)`` picks for these tensors and which
one was faster here: the acceptance is that ``auto`` picks the faster one on the box at hand.
It is printed, not asserted: a 1% timing difference should not fail a run.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.peaks import cuda_time, gpu_bf16_matmul_tflops
from declip_fast.models.attention import attention, resolve_backend, xformers_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASES = {  # name -> (batch, heads, seq, head_dim, causal)
    "ViT-B/16": (256, 12, 197, 64, False),
    "text": (256, 8, 77, 64, True),
}
PHASES = {"fwd": 1.0, "fwd+bwd": 3.5}  # FLOPs in units of the forward's
BACKENDS = ["xformers", "sdpa"]

# (case, phase, backend) -> median seconds, or the reason the backend could not run.
_RESULTS: dict[tuple[str, str, str], float | str] = {}


@pytest.fixture(scope="module")
def matmul_tflops():
    return gpu_bf16_matmul_tflops()


def _inputs(case: str, phase: str):
    batch, heads, seq, head_dim, _ = CASES[case]
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(batch, seq, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    q, k, v = qkv.unbind(2)  # strided BSHD views, as Attention.forward makes them
    if phase == "fwd+bwd":  # leaves that are still views of the one buffer
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    return q, k, v


def _step(case: str, phase: str, backend: str):
    causal = CASES[case][4]
    q, k, v = _inputs(case, phase)
    if phase == "fwd":
        return lambda: attention(q, k, v, causal=causal, backend=backend)
    grad_out = torch.randn_like(q)

    def fwd_bwd():
        out = attention(q, k, v, causal=causal, backend=backend)
        return torch.autograd.grad(out, (q, k, v), grad_out)  # no .grad accumulation kernels

    return fwd_bwd


def _flops(case: str, phase: str) -> float:
    batch, heads, seq, head_dim, causal = CASES[case]
    forward = 4 * batch * heads * seq**2 * head_dim / (2 if causal else 1)
    return PHASES[phase] * forward


def _measure(case: str, phase: str, backend: str) -> float | str:
    """Median seconds (memoised, so both tests share one measurement) or why it cannot run."""
    key = (case, phase, backend)
    if key not in _RESULTS:
        if backend == "xformers" and not xformers_available():
            _RESULTS[key] = "xformers is not importable"
        else:
            try:
                step = _step(case, phase, backend)
                step()  # xformers may import yet have no kernel for this torch / GPU / layout
                _RESULTS[key] = cuda_time(step, reps=15, iters=10)
            except (RuntimeError, NotImplementedError, ValueError) as exc:
                _RESULTS[key] = f"{backend} failed: {type(exc).__name__}: {str(exc)[:200]}"
        torch.cuda.empty_cache()
    return _RESULTS[key]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("case", list(CASES))
def test_attention_gpu(benchmark, report, matmul_tflops, case, phase, backend):
    seconds = _measure(case, phase, backend)
    if isinstance(seconds, str):
        pytest.skip(seconds)
    benchmark.pedantic(_step(case, phase, backend), rounds=1, iterations=1)  # records the case in JSON
    tflops = _flops(case, phase) / seconds / 1e12
    batch, heads, seq, head_dim, causal = CASES[case]
    benchmark.extra_info.update(
        median_s=seconds,
        tflops=tflops,
        of_peak=tflops / matmul_tflops,
        matmul_tflops=matmul_tflops,
        batch=batch,
        heads=heads,
        seq=seq,
        head_dim=head_dim,
        causal=causal,
    )
    report(
        f"attention on {torch.cuda.get_device_name()}, bf16 (bf16 mm peak {matmul_tflops:.0f} TFLOP/s)",
        shape=f"{case} B{batch} H{heads} L{seq} D{head_dim}" + (" causal" if causal else ""),
        phase=phase,
        backend=backend,
        ms=f"{seconds * 1e3:.3f}",
        TFLOPs=f"{tflops:.0f}",
        of_peak=f"{tflops / matmul_tflops:.0%}",
    )


@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("case", list(CASES))
def test_auto_picks_faster(benchmark, report, case, phase):
    q = _inputs(case, "fwd")[0]
    picked = resolve_backend("auto", q)
    measured = {b: _measure(case, phase, b) for b in BACKENDS}
    timed = {b: s for b, s in measured.items() if not isinstance(s, str)}
    if picked not in timed:  # auto chose a backend that cannot run these tensors: a real failure
        pytest.fail(f"auto picked {picked!r}, which did not run: {measured[picked]}")
    benchmark.pedantic(_step(case, phase, "auto"), rounds=1, iterations=1)
    fastest = min(timed, key=timed.get)
    slower_by = timed[picked] / timed[fastest] - 1
    verdict = "yes" if picked == fastest else f"no ({slower_by:.1%} slower)"
    if len(timed) == 1:
        verdict += " (only one backend ran)"
    benchmark.extra_info.update(
        auto=picked,
        fastest=fastest,
        median_s={b: s for b, s in timed.items()},
        not_run={b: s for b, s in measured.items() if isinstance(s, str)},
    )
    cell = lambda b: f"{timed[b] * 1e3:.3f}" if b in timed else "n/a"
    report(
        f"attention backend choice on {torch.cuda.get_device_name()}, bf16",
        shape=case,
        phase=phase,
        auto_picks=picked,
        faster=fastest,
        xformers_ms=cell("xformers"),
        sdpa_ms=cell("sdpa"),
        auto_is_faster=verdict,
    )

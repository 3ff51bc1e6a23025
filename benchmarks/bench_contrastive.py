"""The fused contrastive kernel on a GPU (skipped elsewhere): bf16, forward / backward / both.

For N in {8192, 32768, 131072} and D in {512, 1024}: median time, achieved TFLOP/s counting the
algorithm's FLOPs (2 N^2 D forward, 6 N^2 D backward), the fraction of the bf16 matrix-product
rate measured in the same run (torch.mm on 8192^3), and peak GPU memory beyond inputs and
gradients. In the same run, OpenCLIP's ClipLoss and Inf-CL's flash loss (when installed) where
they fit in memory. A table of the ratios prints at the end.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.peak_memory import correlated_features
from benchmarks.peaks import cuda_time, gpu_bf16_matmul_tflops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SIZES = [8192, 32768, 131072]
DIMS = [512, 1024]
# Useful FLOPs in units of N^2 D, the same count for every implementation so that rates compare
# as times do: forward logits 2, backward dA and dB products 4 plus one logits recompute 2.
# declip_fast's owner-pass backward executes 8 (D <= 256) or 12 (D = 512: two D-chunks each
# recompute the logits); benchmarks/kernel_budget.py counts what each kernel executes.
PHASES = {"fwd": 2, "bwd": 6, "fwd+bwd": 8}


@pytest.fixture(scope="module")
def matmul_tflops():
    return gpu_bf16_matmul_tflops()


def _loss_fn(impl):
    if impl == "declip_fast":
        from declip_fast.kernels.contrastive import clip_loss

        return clip_loss
    if impl == "open_clip":
        return pytest.importorskip("open_clip.loss").ClipLoss()
    if impl == "inf_cl":
        inf_cl = pytest.importorskip("inf_cl")

        def flash(a, b, s):  # both directions, as the CLIP loss
            labels = torch.arange(a.shape[0], device=a.device)
            return (inf_cl.cal_flash_loss(a, b, labels, s) + inf_cl.cal_flash_loss(b, a, labels, s)) / 2

        return flash
    raise ValueError(impl)


@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", ["declip_fast", "open_clip", "inf_cl"])
def test_contrastive_gpu(benchmark, report, matmul_tflops, impl, n, d, phase):
    loss_fn = _loss_fn(impl)
    a, b = correlated_features(n, d, device="cuda")
    a, b = a.bfloat16().requires_grad_(True), b.bfloat16().requires_grad_(True)
    scale = torch.tensor(100.0, device="cuda", requires_grad=True)
    base = torch.cuda.memory_allocated() + 2 * a.numel() * a.element_size()  # + the gradients
    try:
        loss = loss_fn(a, b, scale)
        loss.backward()
        a.grad = b.grad = scale.grad = None
        torch.cuda.reset_peak_memory_stats()
        if phase == "fwd":
            step = lambda: loss_fn(a, b, scale)
        elif phase == "bwd":
            step = lambda: loss_fn(a, b, scale).backward()  # minus the forward, below
        else:
            step = lambda: loss_fn(a, b, scale).backward()
        seconds = cuda_time(step)
        if phase == "bwd":
            seconds -= cuda_time(lambda: loss_fn(a, b, scale))
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{impl} does not fit at N={n}, D={d}")
    benchmark.pedantic(step, rounds=1, iterations=1)
    peak_extra = torch.cuda.max_memory_allocated() - base
    tflops = PHASES[phase] * n * n * d / seconds / 1e12
    benchmark.extra_info.update(
        median_s=seconds,
        tflops=tflops,
        of_peak=tflops / matmul_tflops,
        peak_extra_bytes=peak_extra,
        matmul_tflops=matmul_tflops,
    )
    report(
        f"contrastive loss on {torch.cuda.get_device_name()}, bf16 (bf16 mm peak {matmul_tflops:.0f} TFLOP/s)",
        impl=impl,
        N=n,
        D=d,
        phase=phase,
        ms=f"{seconds * 1e3:.2f}",
        TFLOPs=f"{tflops:.0f}",
        of_peak=f"{tflops / matmul_tflops:.0%}",
        extra_MiB=f"{peak_extra / 2**20:.0f}",
    )

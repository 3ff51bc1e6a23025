"""SigLipLoss on a GPU (skipped elsewhere): bf16 forward + backward, ours against the peers.

For N in {16384, 32768, 65536} and D = 512: median time (CUDA events), achieved TFLOP/s
counting the algorithm's useful FLOPs (6 N^2 D: the logits product forward, the two gradient
products backward; the same count for every implementation, so rates compare as times do; our
two owner passes execute 8 N^2 D, see kernels/siglip.py), the fraction of the bf16
matrix-product rate measured in the same run, and peak GPU memory beyond the inputs and their
gradients. Peers in the same run, where they import and fit in memory: OpenCLIP's SigLipLoss
(dense logits, and chunked where the installed OpenCLIP has ``chunk_size``) and siglip-kernel's
``fused_siglip_loss`` (it takes the log of the scale; its loss is normalised its own way, which
does not change its cost). All run SigLIP's initial values, logit scale 10 and bias -10. The
offline GPU box gets the peers' wheels from scripts/fetch_wheels.sh.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.peak_memory import correlated_features
from benchmarks.peaks import cuda_time, gpu_bf16_matmul_tflops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SIZES = [16384, 32768, 65536]
D = 512
USEFUL = 6  # N^2 D units: forward logits 2, backward d image and d text 4


@pytest.fixture(scope="module")
def matmul_tflops():
    return gpu_bf16_matmul_tflops()


def _loss_fn(impl):
    if impl == "ours":
        from declip_fast.losses import SigLipLoss

        loss = SigLipLoss(impl="triton")
        return lambda a, b, s, t: loss(a, b, s, t)
    if impl == "open_clip":
        loss = pytest.importorskip("open_clip.loss").SigLipLoss()
        return lambda a, b, s, t: loss(a, b, s, t)
    if impl == "open_clip_chunked":  # OpenCLIP's main branch only (see benchmarks/bench_siglip.py)
        from benchmarks.bench_siglip import loss_module

        loss = loss_module(impl)
        return lambda a, b, s, t: loss(a, b, s, t)
    if impl == "siglip_kernel":
        fused = pytest.importorskip("siglip_kernel").fused_siglip_loss
        return lambda a, b, s, t: fused(a, b, torch.log(s), t)
    raise ValueError(impl)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", ["ours", "open_clip", "open_clip_chunked", "siglip_kernel"])
def test_siglip_gpu(benchmark, report, matmul_tflops, impl, n):
    loss_fn = _loss_fn(impl)
    a, b = correlated_features(n, D, device="cuda")
    a, b = a.bfloat16().requires_grad_(True), b.bfloat16().requires_grad_(True)
    scale = torch.tensor(10.0, device="cuda", requires_grad=True)
    bias = torch.tensor(-10.0, device="cuda", requires_grad=True)
    base = torch.cuda.memory_allocated() + 2 * a.numel() * a.element_size()  # + the gradients
    step = lambda: loss_fn(a, b, scale, bias).backward()  # noqa: E731
    try:
        step()
        loss = float(loss_fn(a, b, scale, bias))
        a.grad = b.grad = scale.grad = bias.grad = None
        torch.cuda.reset_peak_memory_stats()
        seconds = cuda_time(step)
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{impl} does not fit at N={n}, D={D}")
    benchmark.pedantic(step, rounds=1, iterations=1)
    peak_extra = torch.cuda.max_memory_allocated() - base
    tflops = USEFUL * n * n * D / seconds / 1e12
    benchmark.extra_info.update(
        median_s=seconds,
        tflops=tflops,
        of_peak=tflops / matmul_tflops,
        peak_extra_bytes=peak_extra,
        matmul_tflops=matmul_tflops,
        loss=loss if math.isfinite(loss) else None,
    )
    report(
        f"SigLipLoss fwd+bwd on {torch.cuda.get_device_name()}, bf16, D={D} (bf16 mm peak {matmul_tflops:.0f} TFLOP/s)",
        impl=impl,
        N=n,
        ms=f"{seconds * 1e3:.2f}",
        TFLOPs=f"{tflops:.0f}",
        of_peak=f"{tflops / matmul_tflops:.0%}",
        extra_MiB=f"{peak_extra / 2**20:.0f}",
    )

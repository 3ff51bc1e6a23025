"""ClipLoss on the CPU: declip_fast (tiled, no stored logits) against OpenCLIP's ClipLoss.

Forward + backward, fp32, D = 512, one process. For each N: the median time over a few rounds
(pytest-benchmark) and the peak extra memory of one step measured in a fresh process
(benchmarks/peak_memory.py), both stored in ``extra_info``. After the last case a table prints
the ratios ours / OpenCLIP and our rate in GFLOP/s (8 N^2 D, the fused algorithm's FLOPs) as a
fraction of this machine's fp32 matrix-product rate, measured in the same run.

``BENCH_CLIP_LOSS_N`` (comma-separated sizes) replaces the sizes for a quick run: the test of the
benchmark plumbing (tests/bench) runs N = 256 to make a real results file in seconds.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.peaks import cpu_fp32_matmul_gflops
from benchmarks.peak_memory import in_fresh_process, loss_module, make_inputs

D = 512
SIZES = [int(n) for n in os.environ.get("BENCH_CLIP_LOSS_N", "4096,16384").split(",")]
IMPLS = ["ours", "open_clip"]
ROUNDS = {4096: 5, 16384: 2}  # other sizes: 3
_measured: dict[tuple[str, int], dict] = {}


@pytest.fixture(scope="module")
def matmul_peak():
    return cpu_fp32_matmul_gflops(d=D)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_clip_loss_forward_backward(benchmark, report, matmul_peak, impl, n):
    loss_fn = loss_module(impl)

    def setup():
        return make_inputs(n, D, torch.float32), {}

    def step(img, txt, scale):
        loss_fn(img, txt, scale).backward()

    benchmark.pedantic(step, setup=setup, rounds=ROUNDS.get(n, 3), warmup_rounds=0)
    median = benchmark.stats.stats.median
    extra = in_fresh_process("benchmarks.peak_memory", impl, n, D)
    benchmark.extra_info.update(median_s=median, peak_extra_bytes=extra, n=n, d=D, dtype="float32")
    _measured[(impl, n)] = {"median": median, "extra": extra}

    if impl == IMPLS[-1]:  # both measured for this n: one row of the ratio table
        ours, theirs = _measured[("ours", n)], _measured[("open_clip", n)]
        gflops = 8 * n * n * D / ours["median"] / 1e9
        report(
            "ClipLoss fwd+bwd on CPU, fp32, D=512: declip_fast vs OpenCLIP",
            N=n,
            ours_s=f"{ours['median']:.3f}",
            open_clip_s=f"{theirs['median']:.3f}",
            time_ratio=f"{ours['median'] / theirs['median']:.2f}x",
            ours_MiB=f"{ours['extra'] / 2**20:.0f}",
            open_clip_MiB=f"{theirs['extra'] / 2**20:.0f}",
            memory_ratio=f"1/{theirs['extra'] / max(ours['extra'], 1):.1f}",
            ours_GFLOPs=f"{gflops:.0f}",
            of_matmul_peak=f"{gflops / matmul_peak:.0%} of {matmul_peak:.0f}",
        )

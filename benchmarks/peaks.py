"""Timing and the matrix-product rates every benchmark divides by, measured in the same run."""

from __future__ import annotations

import time

import torch


def cuda_time(fn, reps: int = 10, iters: int = 1, warmup: int = 3) -> float:
    """Median seconds per call: CUDA events around ``iters`` back-to-back calls, ``reps`` times.

    Several calls per measurement keep the GPU busy between the events, so a ~0.1 ms kernel is
    not timed together with the host's launch latency.
    """
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return sorted(times)[len(times) // 2]


def gpu_bf16_matmul_tflops(n: int = 8192) -> float:
    """The bf16 torch.mm rate of this GPU on n^3 (the issues' reference: 8192^3)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / cuda_time(lambda: a @ b, reps=20) / 1e12


def cpu_fp32_matmul_gflops(n: int = 4096, d: int = 512, reps: int = 10) -> float:
    """The best rate of an fp32 [n, d] x [d, n] product over ``reps`` tries: the CPU peak to beat
    (the best, since other processes sharing the cores only ever slow a product down)."""
    a, b = torch.randn(n, d), torch.randn(n, d)
    a @ b.T  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b.T
        best = min(best, time.perf_counter() - start)
    return 2 * n * n * d / best / 1e9

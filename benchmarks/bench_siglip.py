"""SigLipLoss on the CPU: declip_fast (tiled, gradients in the forward, no stored logits) against
OpenCLIP's SigLipLoss (dense logits, labels and log-sigmoid) and, where the installed OpenCLIP has
it (``chunk_size``, on its main branch since 2026-04, in no release as of open-clip-torch 3.3),
its chunked setting (``chunk_size=CHUNK``: the logits formed one block of image rows at a time;
autograd still keeps every block's logits for the softplus backward). Without it the chunked
cases are skipped, saying so; to measure it, put OpenCLIP's main-branch ``src`` first on
``PYTHONPATH``.

Forward + backward, fp32, D = 512, one process, logit_scale and logit_bias learned. For each N:
the median time over a few rounds (pytest-benchmark) and the peak extra memory of one step
measured in a fresh process (this module run as a script, the same probe as
benchmarks/peak_memory.py: the resident-set high-water mark reset before the step), both stored
in ``extra_info``. After the last case a table prints the ratios ours / OpenCLIP and our rate in
GFLOP/s (6 N^2 D: the three products both implementations run) as a fraction of this machine's
fp32 matrix-product rate, measured in the same run.

``BENCH_SIGLIP_N`` (comma-separated sizes) replaces the sizes for a quick run (e.g. 256).
The probe alone: ``python -m benchmarks.bench_siglip --impl ours --n 4096 --d 512`` prints JSON.
"""

from __future__ import annotations

import inspect
import os

import pytest

D = 512
SIZES = [int(n) for n in os.environ.get("BENCH_SIGLIP_N", "4096,16384").split(",")]
IMPLS = ["ours", "open_clip", "open_clip_chunked"]
PEERS = {"open_clip": "OpenCLIP SigLipLoss", "open_clip_chunked": "OpenCLIP SigLipLoss(chunk_size)"}
CHUNK = 1024
ROUNDS = {4096: 5, 16384: 2}  # other sizes: 3
_measured: dict[tuple[str, int], dict] = {}


def loss_module(impl: str):
    if impl == "ours":
        from declip_fast.losses import SigLipLoss
    elif impl in ("open_clip", "open_clip_chunked"):
        from open_clip.loss import SigLipLoss
    else:
        raise ValueError(f"unknown impl {impl!r}")
    if impl == "open_clip_chunked":
        if "chunk_size" not in inspect.signature(SigLipLoss).parameters:
            pytest.skip("the installed OpenCLIP's SigLipLoss has no chunk_size (main branch only)")
        return SigLipLoss(chunk_size=CHUNK)
    return SigLipLoss()


def make_inputs(n: int, d: int, dtype, seed: int = 0):
    """Correlated unit features, logit_scale 10 and logit_bias -10 (SigLIP's initial values),
    all requiring grad."""
    import torch

    from benchmarks.peak_memory import correlated_features

    img, txt = correlated_features(n, d, dtype, seed)
    scalars = torch.tensor(10.0), torch.tensor(-10.0)
    return tuple(t.requires_grad_(True) for t in (img, txt, *scalars))


def measure(impl: str, n: int, d: int, dtype: str = "float32") -> dict:
    """Peak extra resident memory of one forward + backward (see benchmarks/peak_memory.py)."""
    import torch

    from benchmarks.peak_memory import step_extra_bytes

    loss_fn = loss_module(impl)
    # A small warm-up step first: one-off costs (math libraries, thread pools) are not charged.
    loss_fn(*make_inputs(min(n, 256), d, getattr(torch, dtype))).backward()
    inputs = make_inputs(n, d, getattr(torch, dtype))
    extra = step_extra_bytes(lambda: loss_fn(*inputs).backward())
    return {"impl": impl, "n": n, "d": d, "extra_bytes": extra}


@pytest.fixture(scope="module")
def matmul_peak():
    from benchmarks.peaks import cpu_fp32_matmul_gflops

    return cpu_fp32_matmul_gflops(d=D)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_siglip_forward_backward(benchmark, report, matmul_peak, impl, n):
    import torch

    loss_fn = loss_module(impl)

    def setup():
        return make_inputs(n, D, torch.float32), {}

    def step(img, txt, scale, bias):
        loss_fn(img, txt, scale, bias).backward()

    benchmark.pedantic(step, setup=setup, rounds=ROUNDS.get(n, 3), warmup_rounds=0)
    median = benchmark.stats.stats.median
    from benchmarks.peak_memory import in_fresh_process

    extra = in_fresh_process("benchmarks.bench_siglip", impl, n, D)
    benchmark.extra_info.update(median_s=median, peak_extra_bytes=extra, n=n, d=D, dtype="float32")
    _measured[(impl, n)] = {"median": median, "extra": extra}

    if impl == IMPLS[-1]:  # every implementation of this n has run (or skipped): the table rows
        _report(report, n, matmul_peak)


def _report(report, n, matmul_peak):
    """One row per OpenCLIP setting measured at ``n``: ours against it."""
    ours = _measured.get(("ours", n))
    if ours is None:
        return
    gflops = 6 * n * n * D / ours["median"] / 1e9
    for peer, label in PEERS.items():
        theirs = _measured.get((peer, n))
        if theirs is None:
            continue
        report(
            "SigLipLoss fwd+bwd on CPU, fp32, D=512: declip_fast vs OpenCLIP",
            N=n,
            peer=label,
            ours_s=f"{ours['median']:.3f}",
            peer_s=f"{theirs['median']:.3f}",
            time_ratio=f"{ours['median'] / theirs['median']:.2f}x",
            ours_MiB=f"{ours['extra'] / 2**20:.0f}",
            peer_MiB=f"{theirs['extra'] / 2**20:.0f}",
            memory_ratio=f"1/{theirs['extra'] / max(ours['extra'], 1):.1f}",
            ours_GFLOPs=f"{gflops:.0f}",
            of_matmul_peak=f"{gflops / matmul_peak:.0%} of {matmul_peak:.0f}",
        )


def main() -> None:
    from benchmarks.peak_memory import probe_main

    probe_main(measure, IMPLS, "Peak extra memory of one SigLIP loss forward + backward.")


if __name__ == "__main__":
    main()

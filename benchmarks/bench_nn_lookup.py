"""Top-1 nearest-neighbour lookup: declip_fast against torch's matmul + max and faiss.

Queries [B, D] against a bank [M, D] of L2-normalized rows; each implementation returns the best
score and its index per query (benchmarks/peak_memory_lookup.py defines them):

- ``ours``: on CPU the chunked reference (kernels/reference.py: running maximum over bank chunks,
  never the B x M matrix); on CUDA the Triton kernel (kernels/nn_lookup.py).
- ``torch``: ``(queries @ bank.T).max(dim=1)``, which materializes the B x M scores.
- ``faiss`` (CPU only): ``faiss.IndexFlatIP`` searched with k = 1. Building the index (copying
  the bank into it) happens before timing; the timed call is ``index.search(queries, 1)`` plus
  wrapping its numpy results as tensors (no copy).

Cases: B in {1024, 4096}, M in {16384, 65536, 1048576}, D in {128, 512, 1024}. On a GPU all of
them in bf16 (faiss skipped). On a CPU only M in {16384, 65536} with D in {128, 512}, in fp32:
the rest takes minutes per call on a few cores, and torch's B x M scores reach 16 GiB. Two queue
sizes give the report's lookup plot (time and memory against M) a slope.

Per case and implementation: the median time, the achieved TFLOP/s (2 B M D), GB/s (bank and
queries read once), that rate as a fraction of this machine's matrix-product rate measured in
the same run (CPU: fp32 [4096, 512] x [512, 4096], best of 10, as bench_clip_loss.py; GPU: bf16
torch.mm of 8192^3), and the peak extra memory of one call (CPU: resident set in a fresh process,
benchmarks/peak_memory_lookup.py; GPU: torch.cuda.max_memory_allocated beyond the inputs).
Each implementation's answer is checked on 64 queries before it is timed. Tables print at the
end: every measurement, the ratios ours / torch and ours / faiss, and the acceptance checks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.peaks import cpu_fp32_matmul_gflops, cuda_time, gpu_bf16_matmul_tflops
from benchmarks.peak_memory_lookup import lookup_fn, make_lookup_inputs

REPO = Path(__file__).resolve().parent.parent
BATCHES = [1024, 4096]
BANKS = [16384, 65536, 1048576]
DIMS = [128, 512, 1024]
IMPLS = ["torch", "faiss", "ours"]  # ours last: its test prints the case's ratio row
CPU_BANKS, CPU_DIMS = {16384, 65536}, {128, 512}
CPU_ROUNDS = 3  # 0.3-5 s a call on 2 cores; the answer check before timing doubles as warm-up
ACCEPT_CASE = (4096, 65536, 512)
_measured: dict[tuple, dict] = {}
_inputs: dict[tuple, tuple] = {}  # one case's (queries, bank) at a time; impl varies fastest


@pytest.fixture(scope="module")
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _skip_reason(device: str, impl: str, m: int, d: int) -> str | None:
    if device == "cuda":
        return "faiss-cpu has no GPU search; GPU runs compare ours with torch" if impl == "faiss" else None
    if m not in CPU_BANKS:
        return "CPU runs M <= 65536 only: at M = 1048576 a call takes minutes and torch's B x M scores reach 16 GiB"
    if d not in CPU_DIMS:
        return "CPU runs D in {128, 512} only, to keep the run within a few minutes"
    return None


@pytest.fixture(scope="module")
def matmul_tflops(device):
    """This machine's matrix-product rate in the benchmark's dtype, measured in this run."""
    if device == "cuda":
        return gpu_bf16_matmul_tflops()
    return cpu_fp32_matmul_gflops() / 1e3


def _case_inputs(b: int, m: int, d: int, device: str):
    key = (b, m, d, device)
    if key not in _inputs:
        _inputs.clear()  # free the previous case's bank first (up to 2 GiB on a GPU)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        _inputs[key] = make_lookup_inputs(b, m, d, dtype, device=device)
    return _inputs[key]


def _check_answer(search, queries, bank) -> None:
    """A fast wrong answer measures nothing: on 64 queries the returned score must be the best
    score (the fp32 reference) and the score of the returned row."""
    from declip_fast.kernels.reference import nn_lookup

    q = queries[:64]
    scores, indices = search(q)
    best, _ = nn_lookup(q, bank)
    at_index = (q.float() * bank[indices].float()).sum(-1)
    # fp32: different summation orders differ by ~1e-6 at D <= 1024. bf16: torch's baseline
    # rounds its scores to bf16 (2^-9 relative, scores < 1); 2e-2 still rejects a wrong row.
    tol = 1e-4 if queries.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(scores.float(), best, atol=tol, rtol=0)
    torch.testing.assert_close(at_index, best, atol=tol, rtol=0)


def _cpu_peak_extra_bytes(impl: str, b: int, m: int, d: int) -> int:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.peak_memory_lookup",
            "--impl",
            impl,
            "--b",
            str(b),
            "--m",
            str(m),
            "--d",
            str(d),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    return json.loads(out.stdout)["extra_bytes"]


def _gpu_peak_extra_bytes(search, queries) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    search(queries)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("m", BANKS)
@pytest.mark.parametrize("b", BATCHES)
def test_nn_lookup(benchmark, report, device, matmul_tflops, b, m, d, impl):
    reason = _skip_reason(device, impl, m, d)
    if reason:
        pytest.skip(reason)
    if impl == "faiss":
        pytest.importorskip("faiss")
    queries, bank = _case_inputs(b, m, d, device)
    try:
        search = lookup_fn(impl, bank)  # faiss: the index is built here, outside the timing
    except ModuleNotFoundError as err:  # the Triton kernel not written yet
        pytest.skip(f"{impl} not importable: {err}")
    _check_answer(search, queries, bank)

    if device == "cuda":
        try:
            extra = _gpu_peak_extra_bytes(search, queries)
            seconds = cuda_time(lambda: search(queries))
        except torch.cuda.OutOfMemoryError:
            pytest.skip(f"{impl} does not fit at B={b}, M={m}, D={d}")
        benchmark.pedantic(search, args=(queries,), rounds=1, iterations=1)
    else:
        benchmark.pedantic(search, args=(queries,), rounds=CPU_ROUNDS, iterations=1, warmup_rounds=0)
        seconds = benchmark.stats.stats.median
        benchmark.extra_info["min_s"] = benchmark.stats.stats.min  # less sensitive to other load
        extra = _cpu_peak_extra_bytes(impl, b, m, d)

    tflops = 2 * b * m * d / seconds / 1e12
    gb_s = (b + m) * d * bank.element_size() / seconds / 1e9
    dtype = str(bank.dtype).removeprefix("torch.")
    benchmark.extra_info.update(
        impl=impl,
        b=b,
        m=m,
        d=d,
        dtype=dtype,
        device=device,
        median_s=seconds,
        tflops=tflops,
        gb_s=gb_s,
        of_peak=tflops / matmul_tflops,
        matmul_tflops=matmul_tflops,
        peak_extra_bytes=extra,
    )
    _measured[(impl, b, m, d)] = {"s": seconds, "extra": extra, "of_peak": tflops / matmul_tflops}
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    report(
        f"nn_lookup on {where}, {dtype} (matmul rate {matmul_tflops:.3g} TFLOP/s)",
        impl=impl,
        B=b,
        M=m,
        D=d,
        ms=f"{seconds * 1e3:.2f}",
        TFLOPs=f"{tflops:.3g}",
        GB_s=f"{gb_s:.3g}",
        of_peak=f"{tflops / matmul_tflops:.0%}",
        extra_MiB=f"{extra / 2**20:.1f}",
    )
    if impl == "ours":
        _report_ratios(report, device, b, m, d)


def _ratio(ours: dict, other: dict | None) -> tuple[str, str]:
    """(time ratio, memory ratio) of ours against another implementation, '-' where not run."""
    if other is None:
        return "-", "-"
    memory = ours["extra"] / max(other["extra"], 1)
    shown = "0" if memory == 0 else f"1/{1 / memory:.1f}" if memory < 1 else f"{memory:.2f}x"
    return f"{ours['s'] / other['s']:.2f}x", shown


def _report_ratios(report, device: str, b: int, m: int, d: int) -> None:
    ours = _measured[("ours", b, m, d)]
    torch_run, faiss_run = _measured.get(("torch", b, m, d)), _measured.get(("faiss", b, m, d))
    vs_torch, vs_faiss = _ratio(ours, torch_run), _ratio(ours, faiss_run)
    report(
        "nn_lookup ratios: ours / torch matmul+max and ours / faiss (time, peak extra memory)",
        B=b,
        M=m,
        D=d,
        ours_ms=f"{ours['s'] * 1e3:.2f}",
        torch_ms=f"{torch_run['s'] * 1e3:.2f}" if torch_run else "-",
        faiss_ms=f"{faiss_run['s'] * 1e3:.2f}" if faiss_run else "-",
        time_vs_torch=vs_torch[0],
        memory_vs_torch=vs_torch[1],
        time_vs_faiss=vs_faiss[0],
        memory_vs_faiss=vs_faiss[1],
    )
    table = "nn_lookup acceptance"
    if (b, m, d) == ACCEPT_CASE and torch_run:
        time_ratio, memory_ratio = ours["s"] / torch_run["s"], ours["extra"] / max(torch_run["extra"], 1)
        if device == "cpu":
            report(
                table,
                case=f"B={b} M={m} D={d} fp32",
                criterion="time ours/torch <= 1",
                measured=f"{time_ratio:.2f}",
                ok="yes" if time_ratio <= 1 else "NO",
            )
            report(
                table,
                case=f"B={b} M={m} D={d} fp32",
                criterion="memory ours/torch <= 1/8",
                measured=f"1/{1 / max(memory_ratio, 1e-9):.1f}",
                ok="yes" if memory_ratio <= 1 / 8 else "NO",
            )
        else:
            report(
                table,
                case=f"B={b} M={m} D={d} bf16",
                criterion="speed-up torch/ours >= 1.5",
                measured=f"{1 / time_ratio:.2f}",
                ok="yes" if time_ratio <= 1 / 1.5 else "NO",
            )
    if device == "cuda" and m == max(BANKS):
        report(
            table,
            case=f"B={b} M={m} D={d} bf16",
            criterion="ours >= 60% of the bf16 matmul rate",
            measured=f"{ours['of_peak']:.0%}",
            ok="yes" if ours["of_peak"] >= 0.6 else "NO",
        )

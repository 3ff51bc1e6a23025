"""Our paper-size training steps on the CPU with glibc's default thresholds against the trainer's
``host_memory: retain`` (``declip_fast.distributed.host_memory``): time, page faults and peak
resident memory, before and after.

The allocator is process-wide and cannot be put back once set (setting a threshold turns off
glibc's adaptive ones), so every (step, setting) pair runs in a fresh Python process
(``python -m benchmarks.bench_host_memory IMPL SETTING``), which sets the process up as the
trainer does (``distributed.env.setup("cpu", host_memory=SETTING)``), builds the step of
``benchmarks/bench_step.py`` (ViT-B/32 + 12-layer text, batch 16, fp32, realistic captions),
runs ``WARMUP`` untimed steps and then ``ROUNDS`` timed ones, and prints one JSON line: the
median step time, the minor page faults per timed step (``getrusage``), each part of the step
timed alone as ``bench_step.measure_parts`` does (the image towers are the largest) and the peak
resident set (``VmHWM``). The pairs run interleaved (DeCLIP system, DeCLIP retain, CLIP
system, CLIP retain), so a busy spell on the machine hits both settings alike. CPU only: on a GPU the step's tensors are
on the device (the CUDA caching allocator already keeps them).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import pytest
import torch

CASE = "vit_b32-b16"
IMPLS = ("declip", "ours")
SETTINGS = ("system", "retain")
WARMUP, ROUNDS = 2, 3
LABELS = {"declip": "ours DeCLIP (released)", "ours": "ours CLIP, packed text"}


def child(impl: str, setting: str) -> dict:
    """One step's numbers in this (fresh) process; see the module docstring."""
    from benchmarks import bench_step
    from declip_fast.distributed import env, host_memory

    env.setup("cpu", host_memory=setting)
    step = bench_step.build_step(CASE, impl)
    for _ in range(WARMUP):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    parts = bench_step.measure_parts(step, bench_step.CASES[CASE])
    return dict(
        impl=impl,
        setting=setting,
        retained=host_memory.retain_freed_memory() if setting == "retain" else False,
        median_s=statistics.median(times),
        times_s=times,
        minor_faults_per_step=faults / ROUNDS,
        parts_s=parts,
        max_rss_mib=peak_rss_mib(),
        threads=torch.get_num_threads(),
    )


def peak_rss_mib() -> float:
    """This process's peak resident set (``VmHWM``: the address space's own high-water mark;
    ``getrusage``'s ``ru_maxrss`` would carry the parent's over the fork)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_child(impl: str, setting: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_host_memory", impl, setting]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU benchmark: the GPU step's tensors are on the device")
def test_host_memory(benchmark, report):
    if os.environ.get("BENCH_STEP_QUICK") == "1":
        pytest.skip("BENCH_STEP_QUICK: the paper-size model is left out")
    results: dict[tuple[str, str], dict] = {}

    def measure():
        for impl in IMPLS:
            for setting in SETTINGS:
                results[(impl, setting)] = run_child(impl, setting)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update({f"{i}/{s}": r for (i, s), r in results.items()})
    for impl in IMPLS:
        before, after = results[(impl, "system")], results[(impl, "retain")]
        report(
            "Host memory: glibc defaults vs the trainer's host_memory=retain, paper-size step "
            "(ViT-B/32, batch 16, fp32, CPU; each in a fresh process)",
            step=LABELS[impl],
            system_ms=f"{before['median_s'] * 1e3:.0f}",
            retain_ms=f"{after['median_s'] * 1e3:.0f}",
            retain_vs_system=f"{after['median_s'] / before['median_s']:.2f}x",
            image_towers_system_ms=f"{before['parts_s']['image towers'] * 1e3:.0f}",
            image_towers_retain_ms=f"{after['parts_s']['image towers'] * 1e3:.0f}",
            faults_per_step_system=f"{before['minor_faults_per_step']:,.0f}",
            faults_per_step_retain=f"{after['minor_faults_per_step']:,.0f}",
            peak_rss_system_MiB=f"{before['max_rss_mib']:,.0f}",
            peak_rss_retain_MiB=f"{after['max_rss_mib']:,.0f}",
        )
    clip_s, declip_s = results[("ours", "system")], results[("declip", "system")]
    clip_r, declip_r = results[("ours", "retain")], results[("declip", "retain")]
    report(
        "Host memory: DeCLIP / CLIP step time, each setting (FLOP ratio in the step table)",
        system=f"{declip_s['median_s'] / clip_s['median_s']:.2f}x",
        retain=f"{declip_r['median_s'] / clip_r['median_s']:.2f}x",
    )


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], sys.argv[2])))

"""``distributed.host_memory``: with it, freed tensor memory is reused without page faults; without
it glibc hands the memory back and the next allocations fault again. Each case runs in a fresh
interpreter, because the setting is process-wide and cannot be undone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from declip_fast.distributed import env, host_memory
from declip_fast.train.config import TrainConfig

GLIBC = bool(getattr(os, "confstr", lambda _: "")("CS_GNU_LIBC_VERSION"))

# A step's churn in miniature: 32 tensors of random sizes (256 KiB to 24 MiB) and one of 96 MiB
# (an embedding gradient's size, over glibc's largest mmap threshold) written, then all freed, 16
# times with a fixed seed. Reported: the minor page
# faults of rounds 9-16 (the heap has nearly reached its peak by then) and the pages they wrote.
CHURN = """
import json, random, resource, sys, torch
from declip_fast.distributed import env, host_memory
env.setup("cpu", host_memory=sys.argv[1])
rng = random.Random(0)
faults = pages = 0
for r in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(rng.randint(1 << 16, 6 << 20)) for _ in range(32)] + [torch.ones(24 << 20)]
    written = sum(t.numel() * 4 for t in tensors)
    del tensors
    if r >= 8:
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        pages += written // resource.getpagesize()
print(json.dumps({"faults": faults, "pages": pages, "applied": host_memory._applied}))
"""


def churn(setting: str, **environ: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in host_memory._ENV_KEYS and k != "LD_PRELOAD"}
    out = subprocess.run(
        [sys.executable, "-c", CHURN, setting],
        capture_output=True,
        text=True,
        check=True,
        env={**clean, **environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_retained_memory_is_reused_without_page_faults():
    system, retain = churn("system"), churn("retain")
    assert system["applied"] is None and retain["applied"] is True
    # glibc's adaptive thresholds give much of the freed memory back, the 96 MiB block every
    # round: measured 31% of the written pages fault again (glibc 2.36).
    assert system["faults"] > system["pages"] // 6, system
    # Retained: the heap keeps it; measured 0-2.4% (the heap still grows now and then, as the
    # random sizes fall out differently).
    assert retain["faults"] < retain["pages"] // 20, retain


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_an_allocator_chosen_in_the_environment_is_left_alone():
    chosen = churn("retain", MALLOC_TRIM_THRESHOLD_="131072")
    assert chosen["applied"] is False
    # ... and its behaviour is glibc's (a small trim threshold: the freed memory faults again).
    assert chosen["faults"] > chosen["pages"] // 20, chosen


def test_bad_setting_is_named():
    with pytest.raises(ValueError, match="host_memory must be retain or system, got 'keep'"):
        env.setup("cpu", host_memory="keep")
    with pytest.raises(ValueError, match="host_memory must be retain or system, got 'keep'"):
        TrainConfig(host_memory="keep")


def test_setup_retains_on_the_cpu_unless_told_not_to(monkeypatch):
    calls: list[bool] = []
    monkeypatch.setattr(host_memory, "retain_freed_memory", lambda: calls.append(True) or True)
    env.setup("cpu")
    assert calls == [True]
    env.setup("cpu", host_memory="system")
    assert calls == [True]

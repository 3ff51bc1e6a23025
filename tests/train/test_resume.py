"""Kill a training run with SIGKILL at a random step; ``resume=auto`` must reproduce the
uninterrupted run's loss trajectory exactly (CPU, FFCV demo data, the full DeCLIP objective)."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from declip_fast.data.demo import ensure_demo_data
from declip_fast.train.metrics import read_metrics

STEPS, EVERY = 8, 3
TERMS = ("mvs", "iss", "tss", "nns", "total", "lr", "logit_scale", "grad_norm")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    ensure_demo_data(out, train_size=512, test_size=64, workers=1)
    return out


def _command(run_dir, demo_dir):
    overrides = [f"run_dir={run_dir}", f"demo_data={demo_dir}", f"steps={STEPS}", f"checkpoint_every={EVERY}",
                 "data.batch_size=32", "data.num_workers=1", "loss.queue_size=64", "eval.data=null",
                 "progress=false", "tensorboard=false", "plot=false"]
    return [sys.executable, "-m", "declip_fast.cli", "train", "demo", *overrides]


def _rows(run_dir):
    path = run_dir / "metrics.csv"
    return read_metrics(path) if path.is_file() else []


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_trajectory(tmp_path, demo_dir):
    reference = tmp_path / "reference"
    subprocess.run(_command(reference, demo_dir), check=True, capture_output=True, timeout=600)
    expected = _rows(reference)
    assert [r["step"] for r in expected] == list(range(1, STEPS + 1))

    run = tmp_path / "killed"
    kill_after = random.Random().randint(EVERY + 1, STEPS - 1)  # past the first checkpoint
    proc = subprocess.Popen(_command(run, demo_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while len(_rows(run)) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert len(_rows(run)) < STEPS

    subprocess.run(_command(run, demo_dir), check=True, capture_output=True, timeout=600)
    resumed = _rows(run)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1)), "rows after the checkpoint are redone once"
    for want, got in zip(expected, resumed):
        for key in TERMS:
            assert got[key] == want[key], (f"step {want['step']} {key}: resumed {got[key]} "
                                            f"vs uninterrupted {want[key]} (killed after {kill_after})")


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path, demo_dir):
    run = tmp_path / "preempted"
    proc = subprocess.Popen(_command(run, demo_dir), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 600
    while len(_rows(run)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and out.startswith("preempted"), out
    steps = len(_rows(run))
    assert steps < STEPS and (run / "checkpoints" / f"step_{steps:08d}" / "COMPLETE").is_file()

"""Kill a training run with SIGKILL, twice, at seeded steps; ``resume=auto`` must reproduce the
uninterrupted run's loss trajectory exactly (CPU, FFCV demo data, the full DeCLIP objective).
SIGTERM must save a checkpoint at the step it lands in and exit cleanly.

Where a signal lands is decided by the run itself, not by the test's timing: the run is started
through a small wrapper that patches ``MetricsLogger.log`` to signal its own process right after
the row of a chosen step is flushed (before that step's checkpoint, if it has one). A test that
polled ``metrics.csv`` and signalled from outside could land steps later, or after the run had
finished, on a busy machine; this way each kill lands exactly where the test says, and the test
checks that it did.

The kill steps come from ``random.Random(seed)`` with ``seed`` from ``DECLIP_RESUME_SEED``
(default 0: steps 5 then 7, i.e. a kill between checkpoints 3 and 6, then a kill of the resumed
run after checkpoint 6). Set the variable to try other steps; the seed and the steps are in the
failure messages.
"""

import os
import random
import signal
import subprocess
import sys

import pytest

from declip_fast.data.demo import ensure_demo_data
from declip_fast.train.metrics import read_metrics

STEPS, EVERY = 8, 3
TERMS = ("mvs", "iss", "tss", "nns", "total", "lr", "logit_scale", "grad_norm")
SEED = int(os.environ.get("DECLIP_RESUME_SEED", "0"))
# Two distinct steps past the first checkpoint, before the last step: the first kill sends the
# resume back to checkpoint 3, the second (a kill of the resumed run) lands past where it resumed.
KILL_STEPS = sorted(random.Random(SEED).sample(range(EVERY + 1, STEPS), 2))

# ``declip-fast ARGS`` that sends ``SIGNAL`` to itself once the metrics row of step ``AT`` is
# written and flushed (argv: AT SIGNAL ARGS...). The process is its own and nothing else.
SIGNAL_AT_STEP = """
import os, signal, sys
from declip_fast.cli import main
from declip_fast.train.metrics import MetricsLogger
at, sig = int(sys.argv[1]), getattr(signal, sys.argv[2])
log = MetricsLogger.log
def log_then_signal(self, step, values):
    log(self, step, values)
    if step == at:
        os.kill(os.getpid(), sig)
MetricsLogger.log = log_then_signal
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    ensure_demo_data(out, train_size=512, test_size=64, workers=1)
    return out


def _args(run_dir, demo_dir):
    overrides = [
        f"run_dir={run_dir}",
        f"data.beton={demo_dir}/train.beton",
        f"steps={STEPS}",
        f"checkpoint_every={EVERY}",
        "data.batch_size=32",
        "data.num_workers=1",
        "loss.queue_size=64",
        "eval.data=null",
        "progress=false",
        "tensorboard=false",
        "plot=false",
    ]
    return ["train", "demo", *overrides]


def _command(run_dir, demo_dir):
    return [sys.executable, "-m", "declip_fast.cli", *_args(run_dir, demo_dir)]


def _signalled_at(step, sig, run_dir, demo_dir, **kw):
    """Run the command, signalling itself with ``sig`` right after step ``step``'s row."""
    command = [sys.executable, "-c", SIGNAL_AT_STEP, str(step), sig, *_args(run_dir, demo_dir)]
    return subprocess.run(command, timeout=600, **kw)  # the timeout only keeps a hang from hanging the suite


def _rows(run_dir):
    path = run_dir / "metrics.csv"
    return read_metrics(path) if path.is_file() else []


def _steps(run_dir):
    return [r["step"] for r in _rows(run_dir)]


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_trajectory(tmp_path, demo_dir):
    where = f"DECLIP_RESUME_SEED={SEED}: killed after steps {KILL_STEPS}"
    print(where)
    reference = tmp_path / "reference"
    subprocess.run(_command(reference, demo_dir), check=True, capture_output=True, timeout=600)
    expected = _rows(reference)
    assert [r["step"] for r in expected] == list(range(1, STEPS + 1))

    run = tmp_path / "killed"
    for kill_at in KILL_STEPS:  # the first run, then the run that resumed it
        proc = _signalled_at(kill_at, "SIGKILL", run, demo_dir, capture_output=True, text=True)
        assert proc.returncode == -signal.SIGKILL, f"{where}: not killed at {kill_at}: {proc.stderr[-2000:]}"
        # The kill landed where intended: the rows end at the kill step (any rows of the killed
        # run's predecessor past its checkpoint were dropped on resume, then redone once).
        assert _steps(run) == list(range(1, kill_at + 1)), where

    subprocess.run(_command(run, demo_dir), check=True, capture_output=True, timeout=600)
    resumed = _rows(run)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1)), f"{where}: rows past a checkpoint are redone once"
    for want, got in zip(expected, resumed):
        for key in TERMS:
            assert got[key] == want[key], (
                f"step {want['step']} {key}: resumed {got[key]} vs uninterrupted {want[key]} ({where})"
            )


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path, demo_dir):
    """SIGTERM after step 2's row (not a checkpoint step): the run saves step 2 and says so."""
    run = tmp_path / "preempted"
    proc = _signalled_at(2, "SIGTERM", run, demo_dir, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("preempted"), proc.stdout
    assert _steps(run) == [1, 2]
    assert (run / "checkpoints" / f"step_{2:08d}" / "COMPLETE").is_file()

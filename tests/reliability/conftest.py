"""Shared set-up of the reliability tests: short runs on the demo data (through the real CLI)
or on synthetic batches (the Trainer alone, no loader), and a helper that calls the CLI in this
process and returns (exit status, stderr lines)."""

import math

import pytest

from declip_fast import cli
from declip_fast.data.loader_config import ResumableEpochs
from declip_fast.train.config import load_config
from tests.train.batches import GLOBAL_BATCH, synthetic_batch

BATCH = GLOBAL_BATCH
QUIET = ["progress=false", "tensorboard=false", "plot=false", "eval.data=null"]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from declip_fast.data.demo import ensure_demo_data

    out = tmp_path_factory.mktemp("demo")
    ensure_demo_data(out, train_size=256, test_size=32, workers=1)
    return out


def demo_args(run_dir, demo_dir, *extra) -> list[str]:
    """``declip-fast train demo`` on the small demo data: 16-image batches, tiny queue."""
    return [
        "train",
        "demo",
        f"run_dir={run_dir}",
        f"data.beton={demo_dir}/train.beton",
        "data.batch_size=16",
        "data.num_workers=1",
        "loss.queue_size=32",
        *QUIET,
        *extra,
    ]


def run_cli(capsys, argv) -> tuple[int, list[str]]:
    """``declip-fast ARGV`` in this process: (exit status, stderr lines other than log lines)."""
    capsys.readouterr()
    status = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return status, [line for line in err.splitlines() if line.strip()]


def trainer_config(run_dir, *extra):
    """A data-less run (the Trainer is fed synthetic batches): builds in about a second."""
    return load_config(
        "demo",
        [
            f"run_dir={run_dir}",
            "data.beton=null",
            *QUIET,
            "loss.queue_size=16",
            "optim.warmup_steps=2",
            "steps=20",
            "checkpoint_every=1000",
            *extra,
        ],
    )


class SyntheticLoader(ResumableEpochs):
    """Stands in for the data loader in ``Trainer.train``: 4 synthetic batches per epoch, with the
    loaders' epoch bookkeeping (``set_epoch``, ``position``, ``state_dict``)."""

    def __len__(self):
        return 4

    def __iter__(self):
        epoch, start = self._begin_epoch()
        for b in range(start, 4):
            self._advance(epoch, b + 1)
            yield synthetic_batch(epoch * 4 + b)


def poison_calls(trainer, is_bad):
    """Make the loss NaN on the loss calls (1-based) for which ``is_bad(call)``, as a diverging
    run would (counted in calls, so a step run again after a roll-back is a new call)."""
    forward, calls = trainer.loss_fn.forward, [0]

    def poisoned(features):
        losses = forward(features)
        calls[0] += 1
        if is_bad(calls[0]):
            losses["total"] = losses["total"] * math.nan
        return losses

    trainer.loss_fn.forward = poisoned

"""A diverging run ends as a failure, saves only finite states, rolls back to them, and keeps one
metrics row per step with counters that never go back."""

import math

import torch

from declip_fast.train.checkpoint import Checkpointer
from declip_fast.train.errors import RunFailed
from declip_fast.train.metrics import read_metrics
from declip_fast.train.trainer import Trainer
from tests.reliability.conftest import SyntheticLoader, demo_args, poison_calls, run_cli, trainer_config

import pytest


def _assert_one_row_per_step(run_dir):
    rows = read_metrics(run_dir / "metrics.csv")
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"metrics rows repeated or out of order: {steps}"
    skipped = [r["skipped_steps"] for r in rows]
    assert skipped == sorted(skipped), f"skipped_steps went backwards: {skipped}"
    return rows


def test_a_huge_learning_rate_fails_in_one_line_and_keeps_only_finite_checkpoints(tmp_path, demo_dir, capsys):
    run = tmp_path / "run"
    status, err = run_cli(
        capsys,
        demo_args(
            run, demo_dir, "steps=12", "checkpoint_every=1", "optim.lr=1e9", "max_bad_steps=2", "max_rollbacks=2"
        ),
    )
    assert status == 1
    errors = [line for line in err if line.startswith("error:")]
    assert errors == [err[-1]] and "Traceback" not in "\n".join(err)
    assert "the run diverged" in err[-1] and "lower optim.lr" in err[-1] and "2 roll-back(s) spent" in err[-1]
    _assert_one_row_per_step(run)
    ckpt = Checkpointer(run)
    assert ckpt.complete(), "the finite first step should have been saved"
    for path in ckpt.complete():  # nothing saved inside the non-finite streak
        state = torch.load(path / "state.pt", weights_only=True)
        queue = state["extra"]["loss"]["nns.queue.rows"]
        assert torch.isfinite(queue).all(), path
    rows = {r["step"]: r for r in read_metrics(run / "metrics.csv")}
    for path in ckpt.complete():
        assert math.isfinite(rows[int(path.name[5:])]["total"]), f"{path.name} saved after a non-finite step"


def test_roll_back_truncates_metrics_and_counters_never_decrease(tmp_path):
    trainer = Trainer(trainer_config(tmp_path / "run", "steps=8", "checkpoint_every=2", "max_bad_steps=2")).build()
    trainer.loader = SyntheticLoader()
    poison_calls(trainer, lambda call: call in (5, 6))  # steps 5 and 6, once: roll back to 4
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    assert summary["status"] == "done" and summary["rollbacks"] == 1 and summary["skipped_steps"] == 2
    rows = _assert_one_row_per_step(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(math.isfinite(r["total"]) for r in rows), "the rolled-back rows should be gone"
    assert rows[-1]["skipped_steps"] == 2


def test_a_save_due_inside_a_non_finite_streak_waits_for_a_finite_step(tmp_path):
    trainer = Trainer(trainer_config(tmp_path / "run", "steps=6", "checkpoint_every=2", "max_bad_steps=5")).build()
    trainer.loader = SyntheticLoader()
    poison_calls(trainer, lambda call: call in (2, 3))
    try:
        trainer.train()
    finally:
        trainer.close()
    saved = [p.name for p in Checkpointer(tmp_path / "run").complete()]
    assert saved == ["step_00000004", "step_00000006"], saved  # step 2 was non-finite


def test_a_run_of_mostly_skipped_steps_fails(tmp_path):
    trainer = Trainer(trainer_config(tmp_path / "run", "steps=6", "max_bad_steps=5")).build()
    trainer.loader = SyntheticLoader()
    poison_calls(trainer, lambda call: call % 3 != 1)  # 2 of every 3 steps, never 5 in a row
    with pytest.raises(RunFailed, match=r"4 of the 6 steps run were skipped.*lower optim.lr"):
        trainer.train()
    trainer.close()

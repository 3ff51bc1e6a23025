"""Resuming with a config that changes what the checkpoint means is refused, naming the keys,
unless the change is allowed (``--allow-config-change KEY`` or ``allow_config_change``)."""

import pytest

from declip_fast.train.errors import ConfigError
from declip_fast.train.trainer import Trainer
from tests.reliability.conftest import run_cli, synthetic_batch, trainer_config


def _saved_run(run_dir):
    trainer = Trainer(trainer_config(run_dir, "data.batch_size=16")).build()
    trainer.step(synthetic_batch(0))
    trainer.save()
    trainer.close()


def _train_argv(run_dir, *extra):
    return [
        "train",
        "demo",
        f"run_dir={run_dir}",
        "data.beton=null",
        "loss.queue_size=16",
        "optim.warmup_steps=2",
        "steps=20",
        "checkpoint_every=1000",
        "progress=false",
        "tensorboard=false",
        "plot=false",
        "eval.data=null",
        *extra,
    ]


def test_a_changed_batch_size_is_refused_by_the_cli_unless_allowed(tmp_path, capsys):
    run = tmp_path / "run"
    _saved_run(run)
    before = (run / "config.yaml").read_text()
    status, err = run_cli(capsys, _train_argv(run, "data.batch_size=64"))
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("error: resume:") and "data.batch_size: 16 -> 64" in err[0]
    assert "--allow-config-change data.batch_size" in err[0]
    assert (run / "config.yaml").read_text() == before, "a refused run must not rewrite config.yaml"
    # Allowed: the resume goes through (and this data-less run then stops for want of data).
    status, err = run_cli(capsys, _train_argv(run, "data.batch_size=64", "--allow-config-change", "data.batch_size"))
    assert status == 2 and err[-1] == "error: no training data: set data.beton or data.source"


def test_resuming_a_declip_run_as_clip_names_the_model_and_loss_keys(tmp_path):
    run = tmp_path / "run"
    _saved_run(run)
    with pytest.raises(ConfigError) as info:
        Trainer(trainer_config(run, "data.batch_size=16", "model.preset=clip_tiny", "loss=clip")).build()
    message = str(info.value)
    for key in ("model.preset: 'declip_tiny' -> 'clip_tiny'", "loss.clip", "loss.mvs", "loss.nns"):
        assert key in message, message
    assert "Unexpected key" not in message


def test_allow_config_change_in_the_config_and_unknown_keys(tmp_path):
    run = tmp_path / "run"
    _saved_run(run)
    trainer = Trainer(trainer_config(run, "data.batch_size=8", "allow_config_change=[data.batch_size]")).build()
    trainer.close()
    assert trainer.step_count == 1
    with pytest.raises(ConfigError, match="allow_config_change: 'optim.lr' is not a key"):
        trainer_config(run, "allow_config_change=[optim.lr]")

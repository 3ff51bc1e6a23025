"""A damaged newest checkpoint (truncated file, flipped bytes, no manifest) is reported in one
line and the previous complete one is used; a damaged checkpoint named explicitly is an error."""

import logging

import pytest

from declip_fast.train.checkpoint import Checkpointer
from declip_fast.train.errors import ConfigError
from declip_fast.train.trainer import Trainer
from tests.reliability.conftest import synthetic_batch, trainer_config


def _two_checkpoints(run_dir):
    trainer = Trainer(trainer_config(run_dir)).build()
    for step in range(2):
        trainer.step(synthetic_batch(step))
        trainer.save()
    trainer.close()
    return Checkpointer(run_dir).complete()


def _truncate(folder):
    weights = folder / "__0_0.distcp"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _flip(folder):  # a few bytes in the middle of the stored weights: loads without error
    weights = folder / "__0_0.distcp"
    data = bytearray(weights.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    weights.write_bytes(bytes(data))


def _no_manifest(folder):
    (folder / "MANIFEST.json").unlink()


@pytest.mark.parametrize("damage, what", [(_truncate, "bytes"), (_flip, "sha256"), (_no_manifest, "MANIFEST.json")])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage, what):
    run = tmp_path / "run"
    older, newest = _two_checkpoints(run)
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="declip_fast"):
        trainer = Trainer(trainer_config(run)).build()
    trainer.close()
    assert trainer.step_count == 1, "should resume from the previous complete checkpoint"
    warnings = [
        r.getMessage() for r in caplog.records if r.name.startswith("declip_fast") and r.levelno >= logging.WARNING
    ]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert str(newest) in warnings[0] and what in warnings[0], warnings[0]
    assert Checkpointer(run).complete() == [older]
    assert (newest.parent / (newest.name + ".damaged")).is_dir(), "kept for inspection"


def test_a_damaged_checkpoint_named_by_resume_is_an_error(tmp_path):
    run = tmp_path / "run"
    _, newest = _two_checkpoints(run)
    _flip(newest)
    with pytest.raises(ConfigError, match=rf"resume: checkpoint {newest} is damaged: __0_0.distcp"):
        Trainer(trainer_config(run, f"resume={newest}")).build()
    assert newest.is_dir(), "a checkpoint the user named is not moved"


def test_a_run_saved_before_checksums_still_loads(tmp_path, capsys):
    """A missing manifest is damage only when other checkpoints of the run have one; a run
    whose checkpoints all predate checksums loads, with one warning line."""
    import pytest

    from declip_fast.train import manifest

    old = tmp_path / "step_00000002"
    old.mkdir()
    (old / "weights").write_bytes(b"abc")
    manifest.verify(old)
    assert "no MANIFEST.json" in capsys.readouterr().err
    new = tmp_path / "step_00000004"
    new.mkdir()
    (new / "weights").write_bytes(b"abc")
    (new / manifest.MANIFEST).write_bytes(manifest.manifest_bytes(new))
    manifest.verify(new)
    with pytest.raises(manifest.CheckpointDamaged, match="MANIFEST.json is missing"):
        manifest.verify(old)

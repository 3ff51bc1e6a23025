"""What keeps a run's folder and history sound: the run-folder lock, checkpoints saved only after
a finite step, resuming (checksums verified, the config compared with the checkpoint's, a
damaged newest checkpoint skipped for the previous complete one) and rolling back a diverging
run. A mixin of :class:`declip_fast.train.trainer.Trainer`, kept apart to keep each file short;
it uses the trainer's ``config``, ``rank``, ``world``, ``run_dir``, ``checkpointer``, ``model``,
``optimizer``, ``scheduler``, ``loss_fn``, ``metrics`` and counters.

Choices, and why:

- A checkpoint is written only when the last step was finite (``bad_in_a_row == 0``); a save that
  falls due inside a non-finite streak waits for the next finite step. Every checkpoint is then
  a state the run can go on from, and a roll-back never returns to a broken one.
- On roll-back the rows of ``metrics.csv`` after the checkpoint's step are dropped (as on a
  resume), so each step has one row; ``skipped`` and ``rollbacks`` are not taken back from the
  checkpoint, so they never decrease: they count what happened to the run.
- A damaged checkpoint (``declip_fast.train.manifest``) found by ``resume=auto`` or a roll-back
  is reported in one line and renamed to ``step_XXXXXXXX.damaged`` (kept for inspection, no
  longer a checkpoint), and the previous one is tried. A checkpoint named by ``resume=PATH`` is
  never skipped: it is what the user asked for, so a damaged one is an error.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch.distributed as dist

from declip_fast.train.checkpoint import CheckpointDamaged, check_complete, step_of
from declip_fast.train.errors import ConfigError, RunFailed, UserError, one_line
from declip_fast.train.run_folder import RunFolderLock
from declip_fast.train.validate import check_resume, resume_values

log = logging.getLogger("declip_fast.train.trainer")


class RecoveryMixin:
    lock = None
    _saved_step = None

    # ----------------------------------------------------------------------------------- lock

    def _lock_run_folder(self) -> None:
        """Rank 0 takes the run folder's lock; every rank raises if it could not."""
        self.lock = RunFolderLock(self.run_dir)
        error = None
        if self.rank == 0:
            try:
                self.lock.acquire()
            except UserError as err:
                error = err
            except OSError as err:
                error = ConfigError(f"run_dir: cannot lock {self.lock.path}: {err}")
        if self.world > 1:
            box = [None if error is None else one_line(error)]
            dist.broadcast_object_list(box, src=0)
            if error is None and box[0] is not None:
                error = UserError(box[0])
        if error is not None:
            raise error

    def _release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()

    # ---------------------------------------------------------------------------------- resume

    def _resume(self) -> None:
        cfg = self.config
        if cfg.resume == "never":
            return
        explicit = cfg.resume != "auto"
        if explicit:
            try:
                candidates = [check_complete(cfg.resume)]
            except (ValueError, FileNotFoundError) as err:
                raise ConfigError(f"resume: {one_line(err)}") from None
        else:
            candidates = list(reversed(self.checkpointer.complete()))
        if candidates and self._load_first_good(candidates, explicit=explicit) is None:
            raise ConfigError(
                f"resume: no usable checkpoint in {self.checkpointer.dir}: the damaged ones "
                "were renamed to step_*.damaged; run again to start over, or resume=PATH "
                "from a copy"
            )

    def _load_first_good(self, candidates, explicit=False, keep_counters=False):
        """Load the first candidate that verifies; returns its path (None: all were damaged)."""
        for path in candidates:
            try:
                self.checkpointer.verify(path)
            except CheckpointDamaged as err:
                if explicit:
                    raise ConfigError(f"resume: {one_line(err)}") from None
                log.warning("%s; renamed to %s.damaged, using the previous checkpoint", one_line(err), Path(path).name)
                self._quarantine(Path(path))
                continue
            saved = upgrade_extra(self.checkpointer.read_state(path)["extra"])["trainer"].get("config")
            for change in check_resume(
                saved, resume_values(self.config, self.world), self.config.allow_config_change, path
            ):
                log.warning("resuming with a changed config (allowed): %s", change)
            try:
                self._load(path, keep_counters=keep_counters)
            except (RuntimeError, ValueError, KeyError) as err:
                raise ConfigError(f"resume: checkpoint {path} does not fit this config: {one_line(err)[:300]}") from err
            return path
        return None

    def _quarantine(self, path: Path) -> None:
        if self.rank != 0:
            return
        target, n = path.with_name(path.name + ".damaged"), 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.damaged{n}")
        try:
            os.replace(path, target)
        except OSError as err:
            log.warning("could not rename %s aside: %s", path, err)

    # ------------------------------------------------------------------------------ roll-back

    def _roll_back(self) -> None:
        """Back to the newest sound checkpoint after ``max_bad_steps`` non-finite steps, or
        :class:`RunFailed` once ``max_rollbacks`` are spent or there is none."""
        cfg, streak, step = self.config, self.bad_in_a_row, self.step_count
        self.rollbacks += 1
        path = None
        if self.rollbacks <= cfg.max_rollbacks:
            candidates = [p for p in reversed(self.checkpointer.complete()) if step_of(p) <= step]
            path = self._load_first_good(candidates, keep_counters=True)
        if path is None:
            why = (
                f"{cfg.max_rollbacks} roll-back(s) spent"
                if self.rollbacks > cfg.max_rollbacks
                else "no checkpoint to roll back to"
            )
            raise RunFailed(
                f"the run diverged: {streak} non-finite steps in a row at step {step}, and "
                f"{why} ({self.skipped} steps skipped in all); lower optim.lr (now "
                f"{cfg.optim.lr:g}) or set optim.grad_clip, then run again"
            )
        log.warning(
            "rolled back to %s after %d non-finite steps in a row (roll-back %d of %d)",
            path,
            streak,
            self.rollbacks,
            cfg.max_rollbacks,
        )
        self.metrics.truncate(self.step_count)
        self.bad_in_a_row = 0

    # ----------------------------------------------------------------------------- checkpoint

    def save(self) -> None:
        self.checkpointer.save(self.step_count, self.model, self.optimizer, self.scheduler, states=self.stateful())
        self._saved_step = self.step_count

    def _save_if_sound(self, due: bool) -> None:
        """Save when due (or overdue) and the last step was finite."""
        self._save_due = getattr(self, "_save_due", False) or due
        if self._save_due and self.bad_in_a_row == 0 and self._saved_step != self.step_count:
            self.save()
            self._save_due = False

    def _load(self, path, keep_counters: bool = False) -> None:
        """Resume from ``path``; ``keep_counters`` (a roll-back): the loader goes on with the data
        after the bad stretch instead of replaying it, and ``skipped`` keeps counting."""
        self._rolling_back = keep_counters
        try:
            extra = upgrade_extra(self.checkpointer.load(path, self.model, self.optimizer, self.scheduler))
            for name, component in self.stateful(with_loader=not keep_counters).items():
                component.load_state_dict(extra[name])
        finally:
            self._rolling_back = False
        self._saved_step = self.step_count
        log.info(
            "resumed from %s at step %d (data: epoch %d, batch %d)",
            path,
            self.step_count,
            extra["loader"]["epoch"],
            extra["loader"]["batch"],
        )

    def _check_mostly_skipped(self) -> None:
        """A run whose steps were mostly skipped did not train: fail instead of reporting done."""
        run, bad = self._steps_run, self._steps_skipped_here
        if run and bad * 2 > run:
            raise RunFailed(
                f"{bad} of the {run} steps run were skipped (non-finite loss or gradient): "
                f"the model is not trained; lower optim.lr (now {self.config.optim.lr:g}) or "
                "set optim.grad_clip"
            )


def upgrade_extra(extra: dict) -> dict:
    """A checkpoint's saved states by component (``trainer``, ``loader``, ``loss``); checkpoints
    written before the components kept their own state had one flat dict, read here too."""
    if "trainer" in extra:
        return extra
    return {
        "trainer": {k: extra.get(k) for k in ("step", "skipped", "rollbacks", "config")},
        "loader": {"epoch": extra["epoch"], "batch": extra["batch"]},
        "loss": extra["loss"],
    }


__all__ = ["RecoveryMixin", "upgrade_extra"]

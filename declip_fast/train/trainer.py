"""The trainer: one class that builds the run, steps it, checkpoints it and evaluates it.

``train(config)`` is the whole entry point; :class:`Trainer` has ``build`` / ``step`` / ``train``
/ ``close``. Launch: one process (CPU laptop, one GPU), or ``torchrun`` (the process
group comes from its environment: NCCL on GPUs, gloo on CPUs), where the model is sharded with
FSDP2 (``declip_fast.distributed.fsdp``) and SimSiam's batch norms see the global batch.

A step: forward of the views and heads the loss mixture needs (``DeCLIPLoss.needs()``; the data
config's ``mlm`` / ``two_views`` / ``eda`` follow it), the named losses, backward, the global
gradient norm (clipped when ``optim.grad_clip``), then either the optimizer step, the schedule
and the logit-scale clamp, or, when the loss or the gradient norm is not finite on any rank, no
update at all: the step is counted in ``skipped_steps``. ``max_bad_steps`` such steps in a row
roll the run back to its last checkpoint (at most ``max_rollbacks`` times), as the original
DeCLIP code had to; then, or when most steps were skipped, the run fails with
:class:`~declip_fast.train.errors.RunFailed` instead of reporting success. Checkpoints are only
written after a finite step, the run folder is locked by one process, and resuming checks the
checkpoint's checksums and config (``declip_fast.train.recovery``).

State in a checkpoint (``declip_fast.train.checkpoint``): model, optimizer and schedule, then
each stateful component's own ``state_dict``: the trainer (step, counters, the config record),
the loader (its position: epoch, batch), the loss module (the NNS queue) and each rank's RNG
streams, so a resumed run continues the uninterrupted one exactly (on CPU; GPU kernels may not
be bitwise deterministic). SIGTERM (preemption) finishes the current step, saves and exits
cleanly. Where the process runs (rank, world, device) comes from ``declip_fast.distributed.env``,
and the model is prepared by one ``declip_fast.distributed.fsdp.parallelize`` call whatever the
world size. A step reads the device once (``step``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tqdm import tqdm

from declip_fast.data.loader import build_loader
from declip_fast.distributed import env, fsdp
from declip_fast.eval import zeroshot  # train may import eval; eval never imports train
from declip_fast.losses.declip import DeCLIPLoss
from declip_fast.models import presets
from declip_fast.train.checkpoint import Checkpointer
from declip_fast.train.config import TrainConfig, save_config
from declip_fast.train.errors import ConfigError
from declip_fast.train.recovery import RecoveryMixin
from declip_fast.train.metrics import MetricsLogger, model_flops_per_sample, peak_flops, plot_run
from declip_fast.train.optim import build_optimizer, build_scheduler, clamp_logit_scale
from declip_fast.train.validate import check_run, resume_values

log = logging.getLogger(__name__)


class Trainer(RecoveryMixin):
    def __init__(self, config: TrainConfig):
        self.config = config
        self.step_count = 0
        self.skipped = 0
        self.bad_in_a_row = 0
        self.rollbacks = 0
        self._rolling_back = False
        self._steps_run = self._steps_skipped_here = 0  # in this process, for the final verdict
        self._stop_signal = None
        self._stop_everywhere = False
        self._previous_handler = None
        self.loader = None
        self._loader_state = None  # a checkpoint's loader position, until a loader takes it
        self.metrics = None

    # ----------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """The trainer's own state (the model, optimizer, loader, loss and RNG give theirs):
        the step, the counters of what happened to the run, and the config values a resume is
        checked against (``declip_fast.train.validate.RESUME_KEYS``)."""
        return {
            "step": self.step_count,
            "skipped": self.skipped,
            "rollbacks": self.rollbacks,
            "config": resume_values(self.config, self.world),
        }

    def load_state_dict(self, state: dict) -> None:
        """Back to ``state``'s step; ``skipped`` and ``rollbacks`` never decrease (a roll-back
        keeps what happened since, a resume takes the checkpoint's)."""
        self.step_count = int(state["step"])
        if not self._rolling_back:
            self.skipped = int(state["skipped"])
        self.rollbacks = max(self.rollbacks, int(state["rollbacks"]))

    def stateful(self, with_loader: bool = True) -> dict:
        """The components a checkpoint holds besides model, optimizer, schedule and RNG. The
        loader's position is its own (``loader.state_dict()``); before a loader exists (a
        data-less trainer fed by hand) a loaded position waits in ``_loader_state``."""
        states = {"trainer": self, "loss": self.loss_fn}
        if with_loader:
            states["loader"] = self.loader if self.loader is not None else _PendingLoaderState(self)
        return states

    # ----------------------------------------------------------------------------------- build

    def build(self) -> Trainer:
        """Check the config against the machine and files, lock the run folder, build, resume.
        Nothing in the run folder changes before the lock is held and the resume is accepted."""
        cfg = self.config
        check_run(cfg)
        try:
            self.env = env.setup(cfg.device, cfg.host_memory)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.device, self.rank, self.world = self.env.device, self.env.rank, self.env.world_size
        self.run_dir = Path(cfg.run_dir)
        self._lock_run_folder()
        try:
            self._build_locked()
        except BaseException:
            self.close()
            raise
        return self

    def _build_locked(self) -> None:
        cfg = self.config
        if self.rank == 0:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        self._build_model()
        self._build_optimizer()
        self.checkpointer = Checkpointer(self.run_dir)
        self._resume()
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
        if cfg.data.beton is not None or cfg.data.source is not None:
            self._build_loader()
        self.metrics = MetricsLogger(
            self.run_dir, self.terms, enabled=self.rank == 0, tensorboard=cfg.tensorboard, resume_step=self.step_count
        )

    def _build_model(self) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)  # the same full initial model on every rank
        model = presets.build(cfg.model.preset, device=self.device, **cfg.model.overrides)
        self.loss_fn = DeCLIPLoss(
            cfg.loss, rank=self.rank, world_size=self.world, embed_dim=model.config.embed_dim, device=self.device
        )
        self.loss_fn.defer_enqueue()  # enqueue after the step's one finite check (step)
        self.need = self.loss_fn.needs()
        if self.need["simsiam"] and model.projector is None:
            raise ValueError(f"the loss needs SimSiam heads, but model preset {cfg.model.preset!r} has none")
        if self.need["mlm"] and model.mlm_head is None:
            raise ValueError(f"the loss needs the MLM head, but model preset {cfg.model.preset!r} has none")
        self.terms = [t for t, w in self.loss_fn.weights.items() if w]
        fsdp.parallelize(
            model,
            precision=cfg.precision,
            compile=cfg.model.compile,
            checkpointing=cfg.model.grad_checkpointing,
            shard=self.world > 1,
        )
        self.model = model
        # One process in bf16: autocast (FSDP2's policy casts the parameters instead).
        self.autocast = cfg.precision == "bf16" and self.world == 1

    def _build_optimizer(self) -> None:
        self.optimizer = build_optimizer(self.model, self.config.optim)
        self.scheduler = build_scheduler(self.optimizer, self.config.optim, self.config.steps)

    def _build_loader(self) -> None:
        cfg = self.config
        data = cfg.data
        # What the loss does not use is not produced: no masked captions for CLIP alone.
        data = dataclasses.replace(
            data,
            mlm=self.need["mlm"],
            two_views=self.need["image_views"] == 2,
            eda=self.need["text_views"] == 2,
            seed=cfg.seed + data.seed,
        )
        self.loader = build_loader(data, self.device)

    # ------------------------------------------------------------------------------------ step

    def forward_loss(self, batch: dict) -> tuple[dict, dict]:
        need = self.need
        kwargs = {"images_1": batch["images_1"], "text_1": batch["text_1"]}
        # Host lists, not tensors: FSDP2 moves tensor inputs to the device, and the packed text
        # tower needs the lengths on the host.
        kwargs["text_1_lengths"] = _host_list(batch.get("text_1_lengths"))
        if need["image_views"] == 2:
            kwargs["images_2"] = batch["images_2"]
        if need["text_views"] == 2:
            kwargs["text_2"] = batch["text_2"]
            kwargs["text_2_lengths"] = _host_list(batch.get("text_2_lengths"))
        if need["mlm"]:
            kwargs["mlm_targets"] = batch["mlm_targets"]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(**kwargs)
            losses = self.loss_fn(out)
        return out, losses

    def step(self, batch: dict) -> dict:
        """One training step on ``batch`` (the loader's contract); returns its metrics.

        The step reads the device once: the finite check (reduced over the ranks together with
        the stop flag, one all-reduce), the named losses, the logit scale and the gradient norm
        are stacked into one tensor and copied to the host in one transfer."""
        self.model.train()
        out, losses = self.forward_loss(batch)
        total = losses["total"]
        total.backward()
        grad_norm = self._grad_norm()
        bad = ~(torch.isfinite(total.detach()) & torch.isfinite(grad_norm))
        pending = self.loss_fn.pending_finite()  # the rows NNS would enqueue
        if pending is not None:
            bad = bad | ~pending
        flags = torch.stack([bad.float(), torch.tensor(float(self._stop_signal is not None), device=bad.device)])
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # any rank bad: every rank skips
        scalars = [flags, grad_norm.reshape(1), out["logit_scale"].detach().float().reshape(1)]
        scalars += [v.detach().float().reshape(1) for v in losses.values()]
        host = torch.cat([t.to(grad_norm.device) for t in scalars]).tolist()  # the step's one host sync
        ok, self._stop_everywhere = host[0] == 0.0, host[1] != 0.0
        self._steps_run += 1
        self.loss_fn.commit(ok)  # the queue takes the rows of applied steps only
        if ok:
            self.optimizer.step()
            clamp_logit_scale(self.model, self.config.optim)
            self.bad_in_a_row = 0
        else:
            self.skipped += 1
            self._steps_skipped_here += 1
            self.bad_in_a_row += 1
            log.warning(
                "step %d: non-finite loss or gradient; update skipped (%d in a row)",
                self.step_count + 1,
                self.bad_in_a_row,
            )
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step_count += 1
        values = dict(zip(losses, host[4:]))
        values.update(lr=float(lr), logit_scale=host[3], grad_norm=host[2], skipped_steps=self.skipped)
        return values

    def _grad_norm(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.config.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else math.inf, foreach=True)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return norm.detach().float()

    # ----------------------------------------------------------------------------------- train

    def _batches(self):
        """Batches from the loader, epoch after epoch; the loader keeps the position (it starts
        where a resumed checkpoint's ``loader`` state put it)."""
        if self._loader_state is not None:
            self.loader.load_state_dict(self._loader_state)
            self._loader_state = None
        while True:
            yield from self.loader

    def train(self) -> dict:
        """Run to ``config.steps``; returns a summary (steps, skipped, zero-shot results)."""
        if self.loader is None:
            raise ConfigError("no training data: set data.beton or data.source")
        cfg = self.config
        self._install_sigterm()
        progress = self._progress()
        batches = self._batches()
        global_batch = cfg.data.batch_size * self.world
        flops_per_sample = model_flops_per_sample(self.model, self.need)
        peak = peak_flops(self.device)
        status = "done"
        while self.step_count < cfg.steps:
            start = time.perf_counter()
            batch = next(batches)
            waited = time.perf_counter() - start
            values = self.step(batch)
            elapsed = time.perf_counter() - start
            rate = global_batch / elapsed
            values.update(
                images_per_s=rate,
                images_per_s_per_device=rate / self.world,
                data_wait=waited / elapsed,
                mfu=flops_per_sample * rate / (peak * self.world) if peak and flops_per_sample else None,
            )
            self.metrics.log(self.step_count, values)
            if progress is not None:
                progress.update(1)
                if self.step_count % cfg.log_every == 0:
                    progress.set_postfix(loss=f"{values['total']:.4f}", img_s=f"{rate:.0f}")
            if self.bad_in_a_row >= cfg.max_bad_steps:
                self._roll_back()
                if progress is not None:
                    progress.n = self.step_count
                continue
            self._save_if_sound(self.step_count % cfg.checkpoint_every == 0 or self.step_count == cfg.steps)
            if self._stop_requested():
                self._save_if_sound(True)
                status = "preempted"
                break
        if progress is not None:
            progress.close()
        self._check_mostly_skipped()
        summary = {
            "status": status,
            "steps": self.step_count,
            "skipped_steps": self.skipped,
            "rollbacks": self.rollbacks,
            # Samples the loader could not decode (skipped and counted, never served).
            "skipped_samples": int(getattr(self.loader, "skipped", 0)),
        }
        if status == "done":
            summary["zeroshot"] = self.evaluate()
            self._finish_report(summary)
        return summary

    def _stop_requested(self) -> bool:
        """SIGTERM reached some rank by the last step (the signal may land on the ranks in
        different steps and the save is collective, so the flag travels in the step's reduce)."""
        return self._stop_everywhere or (self.world == 1 and self._stop_signal is not None)

    def _progress(self):
        if self.rank != 0 or not self.config.progress:
            return None
        return tqdm(total=self.config.steps, initial=self.step_count, desc="train", unit="step", dynamic_ncols=True)

    def _install_sigterm(self) -> None:
        def handler(signum, frame):
            self._stop_signal = signum
            log.warning("SIGTERM: saving a checkpoint after this step, then stopping")

        try:
            self._previous_handler = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: leave signals alone
            self._previous_handler = None

    # ------------------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict | None:
        """Zero-shot top-1/top-5 on ``eval.data`` with the classes of ``eval.classes``."""
        ev = self.config.eval
        if not ev.zeroshot or ev.data is None:
            return None
        size = self.model.config.vision.image_size
        return zeroshot.zeroshot_eval(self.model, ev.data, ev.classes, self.device, size, ev.batch_size)

    def _finish_report(self, summary: dict) -> None:
        if self.rank != 0:
            return
        results = summary.get("zeroshot")
        if results is not None:
            (self.run_dir / "zeroshot.json").write_text(json.dumps(results, indent=2) + "\n")
            self.metrics.log_eval(self.step_count, results)
        if self.config.plot:
            plot_run(self.run_dir, self.terms, results)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self._release_lock()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None


class _PendingLoaderState:
    """The loader slot of a trainer that has no loader yet: keeps the position for it."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def state_dict(self) -> dict:
        return dict(self.trainer._loader_state or {"epoch": 0, "batch": 0})

    def load_state_dict(self, state: dict) -> None:
        self.trainer._loader_state = dict(state)


def train(config: TrainConfig) -> dict:
    trainer = Trainer(config).build()
    try:
        return trainer.train()
    finally:
        trainer.close()


def _host_list(lengths: torch.Tensor | None) -> list[int] | None:
    """The loader's host caption lengths as a list (no device sync: they never left the CPU)."""
    return None if lengths is None else lengths.tolist()

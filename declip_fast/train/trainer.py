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

State in a checkpoint (``declip_fast.train.checkpoint``): model, optimizer, schedule, step,
the loss module's state (the NNS queue), the loader position (epoch, batch) and RNG states, so a
resumed run continues the uninterrupted one exactly (on CPU; GPU kernels may not be bitwise
deterministic). SIGTERM (preemption) finishes the current step, saves and exits cleanly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tqdm import tqdm

from declip_fast.data.demo import ensure_demo_data
from declip_fast.data.loader import build_loader
from declip_fast.distributed import batchnorm, fsdp
from declip_fast.eval import zeroshot  # train may import eval; eval never imports train
from declip_fast.losses.declip import DeCLIPLoss
from declip_fast.models import presets
from declip_fast.train.checkpoint import Checkpointer
from declip_fast.train.config import TrainConfig, save_config
from declip_fast.train.errors import ConfigError
from declip_fast.train.recovery import RecoveryMixin
from declip_fast.train.metrics import MetricsLogger, model_flops_per_sample, peak_flops, plot_run
from declip_fast.train.optim import build_optimizer, build_scheduler, clamp_logit_scale
from declip_fast.train.validate import check_run

log = logging.getLogger(__name__)


def _init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); initialises the process group from torchrun's environment."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda, but no CUDA device is available here: set device=cpu (or device=auto)")
    return torch.device(name)


class Trainer(RecoveryMixin):
    def __init__(self, config: TrainConfig):
        self.config = config
        self.step_count = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.skipped = 0
        self.bad_in_a_row = 0
        self.rollbacks = 0
        self._steps_run = self._steps_skipped_here = 0  # in this process, for the final verdict
        self._stop_signal = None
        self._previous_handler = None
        self.loader = None
        self.metrics = None

    # ----------------------------------------------------------------------------------- build

    def build(self) -> Trainer:
        """Check the config against the machine and files, lock the run folder, build, resume.
        Nothing in the run folder changes before the lock is held and the resume is accepted."""
        cfg = self.config
        check_run(cfg)
        self.device = _device(cfg.device)
        self.rank, self.world = _init_distributed(self.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", torch.cuda.current_device())
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
        if cfg.data.beton is not None or cfg.data.source is not None or cfg.demo_data:
            self._build_loader()
        self.metrics = MetricsLogger(self.run_dir, self.terms, enabled=self.rank == 0,
                                     tensorboard=cfg.tensorboard, resume_step=self.step_count)

    def _build_model(self) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)  # the same full initial model on every rank
        model = presets.build(cfg.model.preset, device=self.device, **cfg.model.overrides)
        self.loss_fn = DeCLIPLoss(cfg.loss, rank=self.rank, world_size=self.world,
                                  embed_dim=model.config.embed_dim, device=self.device)
        self.need = self.loss_fn.needs()
        if self.need["simsiam"] and model.projector is None:
            raise ValueError(f"the loss needs SimSiam heads, but model preset {cfg.model.preset!r} has none")
        if self.need["mlm"] and model.mlm_head is None:
            raise ValueError(f"the loss needs the MLM head, but model preset {cfg.model.preset!r} has none")
        self.terms = [t for t, w in self.loss_fn.weights.items() if w]
        if self.world > 1:
            batchnorm.convert(model)
            fsdp.parallelize(model, precision=cfg.precision, compile=cfg.model.compile,
                             checkpointing=cfg.model.grad_checkpointing)
        else:
            model.set_grad_checkpointing(cfg.model.grad_checkpointing)
            if cfg.model.compile:
                for block in model.blocks():
                    block.compile()
        self.model = model
        # One process in bf16: autocast (FSDP2's policy casts the parameters instead).
        self.autocast = cfg.precision == "bf16" and self.world == 1

    def _build_optimizer(self) -> None:
        self.optimizer = build_optimizer(self.model, self.config.optim)
        self.scheduler = build_scheduler(self.optimizer, self.config.optim, self.config.steps)

    def _build_loader(self) -> None:
        cfg = self.config
        data = cfg.data
        if cfg.demo_data:
            paths = ensure_demo_data(cfg.demo_data, progress=self.rank == 0 and cfg.progress, any_build=True)
            if data.beton is None and data.source is None:
                data = dataclasses.replace(data, beton=str(paths.train))
        # What the loss does not use is not produced: no masked captions for CLIP alone.
        data = dataclasses.replace(data, mlm=self.need["mlm"], two_views=self.need["image_views"] == 2,
                                   eda=self.need["text_views"] == 2, seed=cfg.seed + data.seed)
        self.loader = build_loader(data, self.device)

    # ------------------------------------------------------------------------------------ step

    def forward_loss(self, batch: dict) -> tuple[dict, dict]:
        need = self.need
        kwargs = {"images_1": batch["images_1"], "text_1": batch["text_1"]}
        if need["image_views"] == 2:
            kwargs["images_2"] = batch["images_2"]
        if need["text_views"] == 2:
            kwargs["text_2"] = batch["text_2"]
        if need["mlm"]:
            kwargs["mlm_targets"] = batch["mlm_targets"]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(**kwargs)
            losses = self.loss_fn(out)
        return out, losses

    def step(self, batch: dict) -> dict:
        """One training step on ``batch`` (the loader's contract); returns its metrics."""
        self.model.train()
        out, losses = self.forward_loss(batch)
        total = losses["total"]
        total.backward()
        grad_norm = self._grad_norm()
        finite = torch.isfinite(total.detach()) & torch.isfinite(grad_norm)
        if self.world > 1:
            bad = (~finite).to(torch.float32)
            dist.all_reduce(bad)
            finite = bad == 0
        ok = bool(finite)
        self._steps_run += 1
        if ok:
            self.optimizer.step()
            clamp_logit_scale(self.model, self.config.optim)
            self.bad_in_a_row = 0
        else:
            self.skipped += 1
            self._steps_skipped_here += 1
            self.bad_in_a_row += 1
            log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)",
                        self.step_count + 1, self.bad_in_a_row)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step_count += 1
        values = {name: float(v.detach()) for name, v in losses.items()}
        values.update(lr=lr, logit_scale=float(out["logit_scale"].detach()), grad_norm=float(grad_norm),
                      skipped_steps=self.skipped)
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
        while True:
            self.loader.set_epoch(self.epoch, start_batch=self.batch_in_epoch)
            for batch in self.loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    def train(self) -> dict:
        """Run to ``config.steps``; returns a summary (steps, skipped, zero-shot results)."""
        if self.loader is None:
            raise ConfigError("no training data: set data.beton or data.source (or demo_data)")
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
            values.update(images_per_s=rate, images_per_s_per_device=rate / self.world,
                          data_wait=waited / elapsed,
                          mfu=flops_per_sample * rate / (peak * self.world) if peak and flops_per_sample else None)
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
        summary = {"status": status, "steps": self.step_count, "skipped_steps": self.skipped,
                   "rollbacks": self.rollbacks,
                   # Samples the loader could not decode (skipped and counted, never served).
                   "skipped_samples": int(getattr(self.loader, "skipped", 0))}
        if status == "done":
            summary["zeroshot"] = self.evaluate()
            self._finish_report(summary)
        return summary

    def _stop_requested(self) -> bool:
        """SIGTERM reached this rank; with several ranks, any rank (the signal may land on them
        in different steps, and the save is collective): one tiny all-reduce per step."""
        flag = self._stop_signal is not None
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _progress(self):
        if self.rank != 0 or not self.config.progress:
            return None
        return tqdm(total=self.config.steps, initial=self.step_count, desc="train", unit="step",
                    dynamic_ncols=True)

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
        """Zero-shot top-1/top-5 on ``eval.data`` (the demo's test split for ``demo``)."""
        ev = self.config.eval
        if not ev.zeroshot or ev.data is None:
            return None
        size = self.model.config.vision.image_size
        if ev.data == "demo":
            if not self.config.demo_data:
                raise ValueError("eval.data=demo needs demo_data (the demo folder)")
            return zeroshot.zeroshot_demo(self.model, self.config.demo_data, self.device, size)
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


def train(config: TrainConfig) -> dict:
    trainer = Trainer(config).build()
    try:
        return trainer.train()
    finally:
        trainer.close()

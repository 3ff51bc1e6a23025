"""Checkpoints: DCP-sharded model and optimizer, trainer state, per-rank RNG; atomic; resumable.

A checkpoint is one folder, ``run_dir/checkpoints/step_XXXXXXXX/``::

    .metadata, __{rank}_0.distcp   torch.distributed.checkpoint: model + optimizer (sharded)
    state.pt                       rank 0, torch.save: step, world size, scheduler, and the state
                                   dict of each named component (``states``: trainer, loader, loss)
    rng_rank{r}.pt                 rank r, torch.save: torch CPU / CUDA, numpy, python RNG
    MANIFEST.json                  rank 0: sha256 and size of every file above (``manifest``)
    COMPLETE                       rank 0, written last: JSON {"step", "world_size"}

Atomicity: everything is written into ``step_XXXXXXXX.tmp/`` (every file fsynced; DCP's
``FileSystemWriter`` fsyncs its own), and only after every rank has finished does rank 0 write
the manifest of checksums, then ``COMPLETE``, ``os.replace`` the folder to its final name and
fsync the parent folder. Only a folder whose name is exactly ``step_<digits>`` *and* that holds
``COMPLETE`` is a checkpoint, so a crash at any point leaves the previous checkpoint as the newest
one. Stale ``.tmp`` folders are removed by the next successful save.

Choices, and why:

- Model and optimizer go through ``get_state_dict`` / ``set_state_dict``: FQN-keyed, DTensor
  shards under FSDP2, plain tensors in one process, ``torch.compile`` prefixes stripped. DCP
  then saves each rank's shards once and reshards on load.
- The scheduler state and the components' state dicts (the trainer's step and counters, the
  loader's position, the NNS loss module's FeatureQueue rows and {ptr, count}; each component
  gives its own, torchtitan's ``Stateful`` protocol) are NOT put into DCP, though DCP can pickle
  non-tensor leaves: it flattens nested dicts into dotted keys and can load them back only into
  a template of the very same structure, which a resuming trainer does not have for them
  (that is what it is loading). They are replicated on every rank, so rank 0 writes them to
  ``state.pt`` and every rank reads it. The RNG streams (``RNGState``) differ per rank: one
  file each.
- ``state.pt`` and the RNG files are read with ``torch.load(weights_only=True)``: no pickled code
  runs on resume. ``save`` therefore checks up front that the state holds only containers,
  numbers, strings and tensors (naming the offending key), instead of failing at resume time.
- Rank-0-only steps (clean-up, finalisation) broadcast their outcome, so a failure on rank 0
  raises on every rank instead of leaving the others waiting in a barrier.

Limitations: RNG states are per rank; resuming with another world size restores the ranks that
have a file and warns on the others (DCP reshards model and optimizer; the trainer must decide
what a loader position means under another world size). Only numpy's legacy global RNG
(``np.random.seed``) is captured, not ``np.random.Generator`` objects.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_state_dict,
    set_state_dict,
)

from declip_fast.distributed import env, manifest

# The folder layout and the model-only reading live below train (eval reads checkpoints too).
from declip_fast.distributed.checkpoint_format import (  # noqa: F401  (re-exported)
    _NAME,
    COMPLETE,
    STATE_FILE,
    check_complete,
    complete_checkpoints,
    load_model_for_eval,
    step_of,
)
from declip_fast.distributed.checkpoint_format import single_process_is_intended as _single_process_is_intended
from declip_fast.distributed.manifest import MANIFEST, CheckpointDamaged

__all__ = [
    "COMPLETE",
    "MANIFEST",
    "STATE_FILE",
    "CheckpointDamaged",
    "Checkpointer",
    "RNGState",
    "check_complete",
    "load_model_for_eval",
    "rng_state",
    "set_rng_state",
    "step_of",
]

_PLAIN = (str, int, float, bool, bytes, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


_distributed, _rank, _world, _barrier = env.initialized, env.rank, env.world_size, env.barrier


def _on_rank0(fn, what: str) -> None:
    """Run ``fn`` on rank 0 only; every rank raises if it failed there (no one left waiting)."""
    error = None
    if _rank() == 0:
        try:
            fn()
        except Exception as exc:  # reported on every rank below
            error = f"{type(exc).__name__}: {exc}"
            if not _distributed():
                raise
    if _distributed():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise RuntimeError(f"checkpoint {what} failed on rank 0: {error}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _torch_save(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _write_file(path, buffer.getvalue())


def _check_plain(obj, where: str) -> None:
    """Raise TypeError naming the first value that ``torch.load(weights_only=True)`` refuses."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_plain(key, f"{where} key")
            _check_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(
            f"checkpoint {where} is a {type(obj).__name__}: only dicts, lists, tuples, numbers, "
            "strings, None and tensors can be saved (they are loaded with weights_only=True)"
        )


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """This process's RNG states, as tensors and plain Python values."""
    algo, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": [algo, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


class RNGState:
    """This process's RNG streams as one stateful component (``state_dict`` /
    ``load_state_dict``); per rank, so the checkpointer writes it to ``rng_rank{r}.pt``."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warnings.warn(
                f"checkpoint has CUDA RNG states for {len(state['cuda'])} devices, this process "
                f"sees {torch.cuda.device_count()}: CUDA RNG not restored"
            )
    algo, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((algo, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ----------------------------------------------------------------------------- folders


class Checkpointer:
    """Saves to and resumes from ``run_dir/checkpoints``, keeping the ``keep`` newest
    (``keep=None`` keeps all). ``save`` and ``load`` are collective: every rank calls them."""

    def __init__(self, run_dir: str | os.PathLike, keep: int | None = 3):
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep must be an int >= 1 or None, got {keep!r}")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}"

    def complete(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        return complete_checkpoints(self.dir)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None; half-written folders are ignored."""
        found = self.complete()
        return found[-1] if found else None

    def resolve(self, resume: str | os.PathLike) -> Path | None:
        """``"never"`` -> None; ``"auto"`` -> the newest complete checkpoint (None if none);
        anything else is the path of a checkpoint folder, which must be complete."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        return check_complete(resume)

    def verify(self, path: str | os.PathLike) -> Path:
        """``path`` if it is complete and its files match their checksums, else
        :class:`CheckpointDamaged` on every rank (collective: rank 0 reads the files)."""
        error = None
        if _rank() == 0:
            try:
                check_complete(path)
                manifest.verify(path)
            except (ValueError, FileNotFoundError) as exc:
                error = " ".join(str(exc).split())
        if _distributed():
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise CheckpointDamaged(error)
        return Path(path)

    @staticmethod
    def read_state(path: str | os.PathLike) -> dict:
        """The trainer state of checkpoint ``path`` (step, world size, ``extra``) without loading
        any weights: what a resuming trainer compares its config with."""
        return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)

    # ------------------------------------------------------------------------- save

    def save(
        self, step: int, model, optimizer, scheduler=None, extra: dict | None = None, states: dict | None = None
    ) -> Path:
        """Write checkpoint ``step`` atomically (collective); returns its folder.

        ``states``: named stateful components (``state_dict()`` / ``load_state_dict()``: the
        trainer's counters, the loader's position, the loss module's queue), whose state dicts
        are the same on every rank; ``extra``: more plain values and tensors of that kind. Both
        go into ``state.pt`` and come back from ``load``.
        """
        extra = dict(extra or {})
        for name, component in (states or {}).items():
            if name in extra or name in ("step",):
                raise ValueError(f"state {name!r} collides with a key of extra")
            extra[name] = component.state_dict()
        if extra.get("step", step) != step:
            raise ValueError(f"extra['step']={extra['step']} but saving step {step}")
        state = {
            "step": step,
            "world_size": _world(),
            "extra": extra,
            "scheduler": None if scheduler is None else scheduler.state_dict(),
        }
        _check_plain(state, "state")
        final = self.path_for(step)
        tmp = final.with_name(final.name + ".tmp")
        _on_rank0(lambda: self._fresh_dir(tmp), "preparing " + str(tmp))
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with _single_process_is_intended():
            dcp.save(
                {"model": model_sd, "optim": optim_sd},
                storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True),
                no_dist=not _distributed(),
            )
        _torch_save(RNGState().state_dict(), tmp / f"rng_rank{_rank()}.pt")
        if _rank() == 0:
            _torch_save(state, tmp / STATE_FILE)
        _barrier()  # every rank's files are on disk
        _on_rank0(lambda: _finalize(tmp, final, step), "finalising " + str(final))
        if _rank() == 0:
            self._prune()
        _barrier()  # nobody returns (and maybe resumes) before the pruning is done
        return final

    def _fresh_dir(self, tmp: Path) -> None:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)

    def _prune(self) -> None:
        """Keep the ``keep`` newest complete checkpoints; drop stale ``.tmp`` folders (a save
        just completed, so no other save is in flight). A failure here only warns."""
        try:
            doomed = self.complete()[: -self.keep] if self.keep else []
            doomed += [p for p in self.dir.iterdir() if p.name.endswith(".tmp")]
            for path in doomed:
                shutil.rmtree(path)
        except OSError as exc:
            warnings.warn(f"pruning checkpoints in {self.dir} failed: {exc}")

    # ------------------------------------------------------------------------- load

    def load(self, path: str | os.PathLike, model, optimizer, scheduler=None) -> dict:
        """Restore model, optimizer, scheduler and this rank's RNG in place from checkpoint
        ``path`` (collective); returns the saved ``extra`` with ``"step"`` set, holding the state
        dict of each component ``save`` was given, for the caller to restore (the trainer first
        reads checkpoints of the earlier flat layout into that form)."""
        path = check_complete(path)
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        target = {"model": model_sd, "optim": optim_sd}
        with _single_process_is_intended():
            dcp.load(target, storage_reader=dcp.FileSystemReader(str(path)), no_dist=not _distributed())
        set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
        if scheduler is not None:
            if state["scheduler"] is None:
                raise ValueError(f"checkpoint {path} holds no scheduler state")
            scheduler.load_state_dict(state["scheduler"])
        self._load_rng(path, state["world_size"])
        return {**state["extra"], "step": state["step"]}

    @staticmethod
    def _load_rng(path: Path, saved_world: int) -> None:
        rng_file = path / f"rng_rank{_rank()}.pt"
        if not rng_file.is_file():
            warnings.warn(
                f"{rng_file} does not exist (saved with world size {saved_world}, now "
                f"{_world()}): this rank's RNG states are left as they are"
            )
            return
        RNGState().load_state_dict(torch.load(rng_file, map_location="cpu", weights_only=True))


def _finalize(tmp: Path, final: Path, step: int) -> None:
    """Rank 0: mark ``tmp`` complete, then move it to ``final`` atomically."""
    _write_file(tmp / MANIFEST, manifest.manifest_bytes(tmp))
    _write_file(tmp / COMPLETE, json.dumps({"step": step, "world_size": _world()}).encode())
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step: never leave a moment without a complete copy
        old = final.with_name(final.name + ".old.tmp")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)

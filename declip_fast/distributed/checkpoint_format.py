"""A checkpoint folder's layout and reading the model out of one, without the trainer.

``run_dir/checkpoints/step_XXXXXXXX/`` holds a torch.distributed.checkpoint save, ``state.pt``,
``MANIFEST.json`` (:mod:`declip_fast.distributed.manifest`) and, last, ``COMPLETE``. Writing,
resuming and pruning stay in :mod:`declip_fast.train.checkpoint` (which re-exports every name
here); this module is what both it and ``declip_fast.eval`` need, so ``eval`` does not import
``train``.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from declip_fast.distributed import manifest
from declip_fast.distributed.manifest import MANIFEST

COMPLETE = "COMPLETE"
STATE_FILE = "state.pt"
_NAME = re.compile(r"^step_(\d{8,})$")


@contextlib.contextmanager
def single_process_is_intended():
    """DCP warns on every save/load without a process group; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def step_of(path: str | os.PathLike) -> int:
    """The step of checkpoint folder ``path`` (from its name ``step_XXXXXXXX``)."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder name (step_XXXXXXXX)")
    return int(match.group(1))


def check_complete(path: str | os.PathLike) -> Path:
    """``path`` as a Path if it is a complete checkpoint folder, else a ValueError or
    FileNotFoundError that names the path and what is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} is not a folder")
    if _NAME.match(path.name) is None:
        hint = " (a half-written save)" if path.name.endswith(".tmp") else ""
        raise ValueError(
            f"checkpoint {path} is not a checkpoint folder{hint}: expected a folder named "
            "step_XXXXXXXX under run_dir/checkpoints (or resume=auto for the newest)"
        )
    missing = [n for n in (COMPLETE, ".metadata", STATE_FILE, MANIFEST) if not (path / n).is_file()]
    if missing:
        raise ValueError(
            f"checkpoint {path} is incomplete: missing {', '.join(missing)} "
            "(the save did not finish; resume from an earlier checkpoint)"
        )
    return path


def complete_checkpoints(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoint folders in ``checkpoints_dir`` (``run_dir/checkpoints``), oldest
    first; half-written folders are ignored."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if _NAME.match(p.name) and p.is_dir() and (p / COMPLETE).is_file()]
    return sorted(found, key=step_of)


def load_model_for_eval(path_or_run_dir: str | os.PathLike, model) -> Path:
    """Load only the model weights into ``model`` (unsharded, one process, no process group)
    from a checkpoint folder or a run folder (its newest checkpoint); returns the folder."""
    path = Path(path_or_run_dir)
    if (path / "checkpoints").is_dir() or not _NAME.match(path.name):
        found = complete_checkpoints(path / "checkpoints")
        if not found:
            raise FileNotFoundError(
                f"{path} is neither a checkpoint folder nor a run folder with a complete "
                f"checkpoint under {path / 'checkpoints'}"
            )
        path = found[-1]
    path = check_complete(path)
    manifest.verify(path)
    target = {"model": get_model_state_dict(model)}
    with single_process_is_intended():
        dcp.load(target, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
    set_model_state_dict(model, target["model"])  # takes the FQNs get_model_state_dict made
    return path

"""One live process per run folder: an OS-level lock on ``run_dir/.lock``.

Two trainers writing the same run folder destroy each other's work (each removes the other's
half-written checkpoints, each rewrites ``metrics.csv``). ``fcntl.flock`` on a file in the folder
is held by the process, not by the file's existence, so the operating system drops it whatever
way the process ends (SIGKILL, a crash, a lost node on a local disk): there is never a stale lock
to clean up by hand. The holder writes its pid, host and start time into the file, so the
refused process can say who holds the folder. The file itself is never deleted (unlinking a
lock file lets a third process lock a fresh inode while the second still waits on the old one).

Under torchrun only rank 0 takes the lock (the ranks of one job share the folder by design); the
trainer broadcasts the outcome so that the other ranks stop too instead of waiting in a
collective. ``flock`` is advisory and local to a host on some network file systems (NFS before
v4 locks per client): two jobs on different hosts sharing a folder over such a mount are not
kept apart.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from declip_fast.train.errors import UserError

LOCK_FILE = ".lock"


class RunFolderBusy(UserError):
    """Another live process holds the run folder."""


class RunFolderLock:
    """``acquire()`` takes the folder's lock at once or raises :class:`RunFolderBusy`;
    ``release()`` (or the process's end) gives it back."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> RunFolderLock:
        if self.held:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read()
            f.close()
            raise RunFolderBusy(
                f"run_dir {self.run_dir} is in use by another training run "
                f"({describe_holder(holder)}); wait for it to end, stop it, or "
                "choose another run_dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(
            json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
            )
            + "\n"
        )
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def describe_holder(text: str) -> str:
    """ "pid 123 on host h, started 2026-01-01 10:00:00 +0000" from the lock file's content."""
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown: it has not written its details yet"


__all__ = ["LOCK_FILE", "RunFolderBusy", "RunFolderLock", "describe_holder"]

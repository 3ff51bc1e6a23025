"""Where ``declip_fast.data.write`` puts its output, and what it says when it cannot.

- :func:`check` runs before any work (FFCV's import alone takes ~10 s, listing a large source
  longer): OUT must not exist (unless overwriting), its name must fit the file system, and its
  folder must be one this process can write in, or be creatable. OUT's folder is created if
  missing.
- The file is written under a hidden temporary name in OUT's folder,
  ``.OUT.PID.RANDOM.partial`` (OUT cut short if the whole would not fit the file system's name
  limit), and renamed when complete (:class:`Partial`), so an interrupted write never leaves a
  file that looks finished. The writer holds an exclusive ``flock`` on it while it lives.
- A writer killed outright (SIGKILL, the OOM killer, a power cut) cannot remove its temporary file.
  The next write of the same OUT does (:func:`clear_leftovers`): a ``.partial`` of OUT whose lock is
  free and whose process id is no live process here is removed, with a one-line warning naming
  it; one still in use (another write of OUT in progress) is left alone, named the same way.
- Any ``OSError`` on the way (a read-only or missing folder, a name too long, a full disk) becomes
  a :class:`PathError`: one line naming the path, which the CLI prints without a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from pathlib import Path

from declip_fast.data.sources import PathError

log = logging.getLogger(__name__)

_SUFFIX_BYTES = len(".4294967295.0123abcd.partial")  # the longest ".PID.RANDOM.partial"
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

try:
    import fcntl
except ImportError:  # not POSIX: no locks; leftovers are named, never removed
    fcntl = None


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system of ``folder`` takes."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _existing(folder: Path) -> Path:
    """``folder`` or its nearest ancestor that exists (what a ``mkdir -p`` would create in)."""
    while not os.path.lexists(folder) and folder.parent != folder:
        folder = folder.parent
    return folder


def check(out: Path, overwrite: bool) -> None:
    """Raise ``FileExistsError`` or :class:`PathError` now for an output that could not be written."""
    folder = _existing(out.parent)
    name_max, size = _name_max(folder), len(os.fsencode(out.name))
    if size > name_max:
        raise PathError.of(
            f"cannot write {out}",
            OSError(errno.ENAMETOOLONG, f"file name too long ({size} bytes; at most {name_max} here)"),
        )
    try:
        exists = out.exists()
    except OSError as err:  # a folder name in the path too long, a folder we may not look into
        raise PathError.of(f"cannot write {out}", err) from err
    if exists and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if not folder.is_dir():
        raise PathError.of(f"cannot write {out}", OSError(errno.ENOTDIR, f"{folder} is not a folder"))
    if not os.access(folder, os.W_OK | os.X_OK):
        read_only = hasattr(os, "statvfs") and os.statvfs(folder).f_flag & getattr(os, "ST_RDONLY", 1)
        code = errno.EROFS if read_only else errno.EACCES
        what = f"cannot write in {folder}" if folder == out.parent else f"cannot create {out.parent}"
        raise PathError.of(what, OSError(code, os.strerror(code)))


@contextlib.contextmanager
def errors(what: str):
    """Turn an ``OSError`` of the block into a :class:`PathError` ``"{what}: {reason}"``."""
    try:
        yield
    except PathError:
        raise
    except OSError as err:
        raise PathError.of(what, err) from err


def _prefix(name: str, name_max: int) -> str:
    """The start of OUT's temporary names: ``"." + name``, cut to leave room for the rest."""
    return "." + os.fsdecode(os.fsencode(name)[: max(1, name_max - 1 - _SUFFIX_BYTES)])


class Partial:
    """OUT's temporary file, created (and locked) in OUT's folder, which is made if missing."""

    def __init__(self, out: Path):
        self.out, folder = out, out.parent
        with errors(f"cannot create the output folder {folder}"):
            folder.mkdir(parents=True, exist_ok=True)
        clear_leftovers(out)
        self.path = folder / f"{_prefix(out.name, _name_max(folder))}.{os.getpid()}.{os.urandom(4).hex()}.partial"
        with errors(f"cannot write in the output folder {folder}"):
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o666)
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a file system without locks: the process id alone marks it in use
                pass

    def publish(self, overwrite: bool) -> None:
        """Rename the finished file to OUT (without overwrite, never over a file that appeared)."""
        try:
            with errors(f"cannot move the finished file {self.path} to {self.out}"):
                if overwrite:
                    os.replace(self.path, self.out)
                    return
                try:
                    os.link(self.path, self.out)  # fails if OUT exists, atomically
                except FileExistsError:
                    raise FileExistsError(
                        f"{self.out} appeared during the write; pass overwrite=True to replace it"
                    ) from None
                except OSError:  # a file system without hard links
                    check(self.out, overwrite)
                    os.replace(self.path, self.out)
                    return
                self.path.unlink()
        finally:
            self.close()

    def discard(self) -> None:
        """Remove the temporary file (an error or an interruption)."""
        try:
            self.path.unlink(missing_ok=True)
        finally:
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # lets go of the lock
            self.fd = None


def clear_leftovers(out: Path) -> None:
    """Remove the temporary files of OUT that interrupted writes left behind (a warning each)."""
    folder = out.parent
    pattern = re.compile(re.escape(_prefix(out.name, _name_max(folder))) + r"\.(\d+)\.[0-9a-f]{8}\.partial")
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        path = folder / name
        if fcntl is None:
            log.warning(
                "%s: a temporary file of an interrupted or running write of %s; remove it if no write is running",
                path,
                out,
            )
        elif _in_use(path, int(match.group(1))):
            log.warning("%s: another write of %s is in progress; left alone", path, out)
        else:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as err:
                log.warning("cannot remove %s, left by an interrupted write of %s: %s", path, out, err.strerror)
                continue
            log.warning("removed %s, left by an interrupted write of %s", path, out)


def _in_use(path: Path, pid: int) -> bool:
    """Whether a writer may still hold ``path``: its process lives here, or its lock is taken."""
    if pid != os.getpid():
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            pass
        except OSError:  # EPERM: a live process of another user
            return True
    try:
        fd = os.open(path, os.O_RDONLY | _CLOEXEC)
    except FileNotFoundError:
        return True  # gone already: nothing to do
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no locks on this file system: the process id decided
        return False
    finally:
        os.close(fd)
    return False

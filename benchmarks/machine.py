"""What a benchmark result was measured on: device, core count, library versions, commit, date.

Stored in every results file (benchmarks/conftest.py adds it to pytest-benchmark's
``machine_info``) so that a number can be read without the run's log: the device names the
file (``<date>-<device slug>.json``) and titles every table and plot ``report.py`` makes.
Run as ``python -m benchmarks.machine`` to print it as JSON.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct"}


def cpu_name() -> str:
    """The CPU model, as /proc/cpuinfo names it (platform's answer where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    """The accelerator the benchmarks ran on: the first CUDA device's name, else the CPU's."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_name()


def device_slug(name: str | None = None) -> str:
    """A short file-name-safe device name: ``cpu`` or the GPU's model, e.g. ``NVIDIA H100 80GB
    HBM3`` -> ``h100``, ``NVIDIA GeForce RTX 4090`` -> ``rtx-4090``."""
    if name is None:
        import torch

        if not torch.cuda.is_available():
            return "cpu"
        name = torch.cuda.get_device_name(0)
    words = [w for w in re.split(r"[\s_\-/]+", name.lower()) if w and w not in _VENDOR_WORDS]
    picked = []
    for word in words:  # up to and including the first word with a digit: the model number
        picked.append(re.sub(r"[^a-z0-9]", "", word))
        if any(c.isdigit() for c in word):
            break
    return "-".join(w for w in picked if w) or "gpu"


@contextlib.contextmanager
def intra_op_threads(n: int):
    """``torch.set_num_threads(n)`` for the block, the previous count restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(*cmd: str) -> str | None:
    """A command's stripped stdout, or None where the tool is missing or fails."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    """(commit, whether tracked files differ from it). Without git (a GPU box gets a copy of the
    tree, not the repository) the commit comes from $BENCH_COMMIT if set, else None."""
    commit = _run("git", "rev-parse", "HEAD")
    if commit is None:
        return os.environ.get("BENCH_COMMIT"), None
    status = _run("git", "status", "--porcelain", "--untracked-files=no")
    return commit, None if status is None else bool(status)


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # missing, or broken for this torch: the file says so with a null
        return None


def metadata() -> dict:
    """Everything a results file records about its machine (JSON-ready)."""
    import torch

    driver = _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    commit, dirty = git_state()
    now = datetime.datetime.now().astimezone()
    return {
        "device": device_name(),
        "device_slug": device_slug(),
        "cpu_name": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda_runtime": torch.version.cuda,
        "cuda_driver": driver.splitlines()[0] if driver else None,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "date": now.date().isoformat(),
        "datetime": now.isoformat(timespec="seconds"),
    }


if __name__ == "__main__":
    print(json.dumps(metadata(), indent=2))

"""Where this process runs: rank, world size and device, in one place.

Every other module asks here instead of calling ``torch.distributed`` for its rank, so one process
(a laptop, one GPU) and ``torchrun`` (N processes) follow the same code: without an initialized
process group the rank is 0 and the world size 1.

``setup(device)`` is what a training entry point calls once: it resolves ``"auto"`` to CUDA
when there is a GPU, and under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) picks the
process's GPU from ``LOCAL_RANK`` and initialises the process group (NCCL on GPUs, gloo on CPUs).
Nothing happens at import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from declip_fast.distributed import host_memory as host_memory_module


def initialized() -> bool:
    """A torch.distributed process group is up."""
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    return dist.get_rank(group) if initialized() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if initialized() else 1


def barrier() -> None:
    if initialized():
        dist.barrier()


def launched_world_size() -> int:
    """The world size torchrun asked for (``WORLD_SIZE``; 1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``; a ValueError when
    CUDA is asked for and there is none."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda, but no CUDA device is available here: set device=cpu (or device=auto)")
    return torch.device(name)


@dataclass(frozen=True)
class Env:
    """This process's place in the job."""

    device: torch.device
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto", host_memory: str = "retain") -> Env:
    """Resolve the device and join the job: under torchrun, set this process's GPU and
    initialise the process group (once; an existing group is kept). On the CPU with
    ``host_memory="retain"``, freed tensor memory stays in the process
    (``declip_fast.distributed.host_memory``); ``"system"`` leaves the C library's defaults."""
    if host_memory not in host_memory_module.SETTINGS:
        raise ValueError(f"host_memory must be retain or system, got {host_memory!r}")
    dev = resolve_device(device)
    if dev.type == "cpu" and host_memory == "retain":
        host_memory_module.retain_freed_memory()
    if not initialized() and launched_world_size() > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda" and initialized():
        dev = torch.device("cuda", torch.cuda.current_device())
    return Env(dev, rank(), world_size())


__all__ = ["Env", "barrier", "initialized", "launched_world_size", "rank", "resolve_device", "setup", "world_size"]

"""Run a worker on WORLD local gloo ranks and collect what each rank saved."""

import os
import socket

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, world: int, out_dir, *args) -> list:
    """Spawn ``worker(rank, port, out_dir, *args)`` on ``world`` ranks; each must
    ``torch.save`` its results to ``out_dir/rank{rank}.pt``. Returns them in rank order."""
    mp.start_processes(worker, args=(_free_port(), str(out_dir), *args), nprocs=world, start_method="spawn")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]

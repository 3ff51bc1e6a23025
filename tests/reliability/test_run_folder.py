"""A run folder is owned by one live process: a second trainer refuses at once in one line that
names the holder; the OS frees the folder when the holder dies, even by SIGKILL; under torchrun
only rank 0 holds it and every rank stops when it is busy."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from declip_fast.train.errors import UserError
from declip_fast.train.run_folder import RunFolderBusy, RunFolderLock
from declip_fast.train.trainer import Trainer
from tests.distributed.launch import run_ranks
from tests.reliability.conftest import run_cli, trainer_config

HOLD = (
    "import sys; from declip_fast.train.run_folder import RunFolderLock; "
    "lock = RunFolderLock(sys.argv[1]).acquire(); print('held', flush=True); sys.stdin.read()"
)


def _holder(run_dir):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_trainer_refuses_and_the_lock_dies_with_its_holder(tmp_path, capsys):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        status, err = run_cli(
            capsys,
            [
                "train",
                "demo",
                f"run_dir={run}",
                "data.beton=null",
                "progress=false",
                "tensorboard=false",
                "plot=false",
                "eval.data=null",
            ],
        )
        assert status == 2 and len(err) == 1, err
        assert err[0].startswith(
            f"error: run_dir {run} is in use by another training run "
            f"(pid {holder.pid} on host {socket.gethostname()}, started "
        ), err[0]
        assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    trainer = Trainer(trainer_config(run)).build()  # the OS dropped the dead holder's lock
    try:
        assert trainer.lock.held
        with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):
            RunFolderLock(run).acquire()  # a second open file in this very process is refused too
    finally:
        trainer.close()
    RunFolderLock(run).acquire().release()  # close() released it


def _rank_worker(rank, port, out_dir, run_root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    result = {}
    try:
        try:
            Trainer(trainer_config(Path(run_root) / "busy", "data.batch_size=4")).build()
        except UserError as err:
            result["busy"] = str(err)
        trainer = Trainer(trainer_config(Path(run_root) / "free", "data.batch_size=4")).build()
        result["held"] = trainer.lock.held
        trainer.close()
    finally:
        torch.distributed.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.distributed
def test_under_torchrun_rank_0_holds_the_lock_and_every_rank_stops_when_busy(tmp_path):
    holder = _holder(tmp_path / "busy")
    try:
        ranks = run_ranks(_rank_worker, 2, tmp_path, str(tmp_path))
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert [r["held"] for r in ranks] == [True, False]
    assert all(f"pid {holder.pid}" in r.get("busy", "") for r in ranks), ranks

"""Checkpointer: bit-exact resume in one process and under 2 gloo ranks with FSDP2, crash safety
of a save, pruning, resolve's errors, and loading weights for evaluation."""

import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from declip_fast.losses.nns import FeatureQueue
from declip_fast.train import checkpoint
from declip_fast.train.checkpoint import Checkpointer, load_model_for_eval
from tests.distributed.launch import run_ranks


class QueueLoss(nn.Module):
    """A loss whose value depends on a FeatureQueue's rows and write pointer. With ``gather``
    every rank enqueues the global batch, so queues agree across ranks (as in NNSLoss)."""

    def __init__(self, gather=False):
        super().__init__()
        self.queue = FeatureQueue(11, 4)  # 8 rows per step: wraps on the second step
        self.gather = gather

    def forward(self, out, target):
        loss = F.mse_loss(out, target)
        if len(self.queue):  # features() copies: the enqueue below cannot touch the graph
            loss = loss + (F.normalize(out, dim=-1) @ self.queue.features().T).mean()
        self.queue.enqueue(out, gather=self.gather)
        return loss


class Run:
    """Model (with dropout, so the RNG matters) + AdamW + LambdaLR + queue loss; weights from
    ``seed``. Each step draws its data from torch, numpy and python ``random``."""

    def __init__(self, seed):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(6, 15), nn.GELU(), nn.Dropout(0.3), nn.Linear(15, 4))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-2, weight_decay=0.1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0 / (1.0 + s))
        self.loss_fn = QueueLoss()

    def step(self):
        x = torch.randn(8, 6)
        target = torch.randn(8, 4) * float(np.random.rand()) + random.random()
        loss = self.loss_fn(self.model(x), target)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.sched.step()
        return loss.detach()

    def objs(self):
        return self.model, self.opt, self.sched

    def save(self, ckpt, step, **extra):
        return ckpt.save(step, *self.objs(), extra={"loss": self.loss_fn.state_dict(), **extra})

    def load(self, ckpt, path):
        extra = ckpt.load(path, *self.objs())
        self.loss_fn.load_state_dict(extra["loss"])
        return extra


def _seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _draws():
    return torch.rand(3), float(np.random.rand()), random.random()


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("into", ["same objects", "fresh objects"])
def test_resume_is_bit_exact(tmp_path, into):
    ckpt = Checkpointer(tmp_path)
    run = Run(seed=0)
    _seed_all(1)
    for _ in range(3):
        run.step()
    path = run.save(ckpt, 3, loader={"epoch": 1, "batch": 3})
    expected = [run.step() for _ in range(4)]  # uninterrupted: this also perturbs everything
    expected_draws, expected_params = _draws(), _params(run.model)

    if into == "fresh objects":
        run = Run(seed=99)
    _seed_all(5)
    extra = run.load(ckpt, ckpt.resolve("auto"))
    assert ckpt.resolve("auto") == path
    assert extra["step"] == 3 and extra["loader"] == {"epoch": 1, "batch": 3}
    assert len(run.loss_fn.queue) == 11 and run.loss_fn.queue.get_extra_state()["ptr"] == 2
    resumed = [run.step() for _ in range(4)]
    for i, (a, b) in enumerate(zip(resumed, expected)):
        assert torch.equal(a, b), f"step {4 + i}: {a.item()} != {b.item()}"
    got = _draws()
    assert torch.equal(got[0], expected_draws[0]) and got[1:] == expected_draws[1:]
    _assert_same(_params(run.model), expected_params)
    assert run.sched.last_epoch == 7 and run.opt.param_groups[0]["lr"] == 3e-2 / 8


def _fail_before_marker(monkeypatch):
    real = checkpoint._write_file

    def write(path, data):
        if path.name == checkpoint.COMPLETE:
            raise OSError("disk full (simulated)")
        real(path, data)

    monkeypatch.setattr(checkpoint, "_write_file", write)


def _fail_before_rename(monkeypatch):  # COMPLETE is written, the folder still ends in .tmp
    def fsync(path):
        raise OSError("power cut (simulated)")

    monkeypatch.setattr(checkpoint, "_fsync_dir", fsync)


@pytest.mark.parametrize("crash", [_fail_before_marker, _fail_before_rename])
def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch, crash):
    ckpt = Checkpointer(tmp_path)
    run = Run(seed=0)
    _seed_all(1)
    run.step()
    good = run.save(ckpt, 2)
    saved_params = _params(run.model)
    run.step()
    with monkeypatch.context() as m:
        crash(m)
        with pytest.raises(OSError, match="simulated"):
            run.save(ckpt, 4)
    tmp = ckpt.dir / "step_00000004.tmp"
    assert (tmp / ".metadata").is_file() and (tmp / "state.pt").is_file()  # DCP had written
    assert (tmp / checkpoint.COMPLETE).is_file() == (crash is _fail_before_rename)
    assert ckpt.latest() == good == ckpt.resolve("auto")
    with pytest.raises(ValueError, match="half-written"):
        ckpt.resolve(tmp)

    fresh = Run(seed=7)
    fresh.load(ckpt, ckpt.latest())
    _assert_same(_params(fresh.model), saved_params)

    # The next save replaces the stale .tmp and completes.
    assert run.save(ckpt, 4) == ckpt.latest() == ckpt.dir / "step_00000004"
    assert sorted(p.name for p in ckpt.dir.iterdir()) == ["step_00000002", "step_00000004"]


def test_folder_without_marker_is_ignored(tmp_path):
    ckpt = Checkpointer(tmp_path)
    run = Run(seed=0)
    good = run.save(ckpt, 1)
    bad = run.save(ckpt, 5)
    (bad / checkpoint.COMPLETE).unlink()
    assert ckpt.latest() == good
    with pytest.raises(ValueError, match=rf"{bad}.*missing COMPLETE"):
        ckpt.resolve(bad)


def test_prune_keeps_newest_and_resaving_a_step_works(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    run = Run(seed=0)
    for step in (1, 2, 3):
        run.save(ckpt, step)
    (ckpt.dir / "step_00000010.tmp").mkdir()  # a stale half-written save
    run.step()
    run.save(ckpt, 12)
    assert sorted(p.name for p in ckpt.dir.iterdir()) == ["step_00000003", "step_00000012"]
    after = _params(run.model)
    run.step()
    run.save(ckpt, 12)  # overwriting a complete checkpoint goes through a rename too
    assert [p.name for p in ckpt.complete()] == ["step_00000003", "step_00000012"]
    assert not _params_equal(after, _load_params(ckpt.latest()))
    _assert_same(_load_params(ckpt.latest()), _params(run.model))

    keep_all = Checkpointer(tmp_path / "all", keep=None)
    for step in range(5):
        run.save(keep_all, step)
    assert len(keep_all.complete()) == 5
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, keep=0)


def _load_params(path):
    run = Run(seed=3)
    load_model_for_eval(path, run.model)
    return _params(run.model)


def _params_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_resolve_errors_name_the_path_and_the_problem(tmp_path):
    ckpt = Checkpointer(tmp_path / "run")
    assert ckpt.resolve("never") is None
    assert ckpt.resolve("auto") is None  # no checkpoints folder yet
    missing = tmp_path / "nope" / "step_00000001"
    with pytest.raises(FileNotFoundError, match=f"{missing} does not exist"):
        ckpt.resolve(missing)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=f"{a_file} is not a folder"):
        ckpt.resolve(str(a_file))
    with pytest.raises(ValueError, match="step_XXXXXXXX"):
        ckpt.resolve(tmp_path)  # a folder, but not a checkpoint
    path = Run(seed=0).save(ckpt, 3)
    assert ckpt.resolve(str(path)) == path and ckpt.resolve("auto") == path
    (path / "state.pt").unlink()
    with pytest.raises(ValueError, match=rf"{path} is incomplete: missing state.pt"):
        ckpt.resolve(path)
    with pytest.raises(ValueError, match="incomplete"):
        Run(seed=0).load(ckpt, path)


def test_unsaveable_extra_fails_before_writing(tmp_path):
    ckpt = Checkpointer(tmp_path)
    run = Run(seed=0)
    with pytest.raises(TypeError, match=r"\['extra'\]\['bad'\]\[1\] is a object"):
        ckpt.save(1, *run.objs(), extra={"bad": [1, object()]})
    with pytest.raises(ValueError, match="extra"):
        ckpt.save(1, *run.objs(), extra={"step": 2})
    assert not ckpt.dir.exists() or not any(ckpt.dir.iterdir())


def test_missing_rng_file_warns_and_leaves_rng(tmp_path):
    ckpt = Checkpointer(tmp_path)
    run = Run(seed=0)
    path = run.save(ckpt, 1)
    (path / "rng_rank0.pt").unlink()
    _seed_all(42)
    before = torch.get_rng_state()
    with pytest.warns(UserWarning, match="rng_rank0.pt does not exist"):
        run.load(ckpt, path)
    assert torch.equal(torch.get_rng_state(), before)


def test_load_model_for_eval_from_run_or_checkpoint(tmp_path):
    ckpt = Checkpointer(tmp_path)
    run = Run(seed=0)
    run.step()
    run.save(ckpt, 1)
    run.step()
    last = run.save(ckpt, 2)
    for where in (tmp_path, last):
        _assert_same(_load_params(where), _params(run.model))
    with pytest.raises(FileNotFoundError, match="complete checkpoint"):
        load_model_for_eval(tmp_path / "empty", Run(seed=0).model)


# ----------------------------------------------------------------------------- 2 ranks, FSDP2

WORLD = 2


def _fsdp_worker(rank, port, out_dir, phase, run_dir):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)  # two ranks on a 2-core box: no oversubscription
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        run = Run(seed=0 if phase == "train" else 123)
        for layer in (run.model[0], run.model[3]):  # 15 rows: uneven shards
            fully_shard(layer)
        fully_shard(run.model)
        run.opt = torch.optim.AdamW(run.model.parameters(), lr=3e-2, weight_decay=0.1)
        run.sched = torch.optim.lr_scheduler.LambdaLR(run.opt, lambda s: 1.0 / (1.0 + s))
        run.loss_fn = QueueLoss(gather=True)
        ckpt = Checkpointer(run_dir)
        _seed_all(10 + rank)  # each rank its own data and dropout streams
        result = {}
        if phase == "train":
            for _ in range(3):
                run.step()
            run.save(ckpt, 3, loader={"epoch": 0, "batch": 3 * WORLD})
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            result["saved"] = get_model_state_dict(run.model, options=full)
        else:
            result["extra"] = run.load(ckpt, ckpt.resolve("auto"))
        result["losses"] = [run.step() for _ in range(2)]
        result["draw"] = _draws()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_fsdp2_resume_reproduces_losses(tmp_path):
    run_dir = tmp_path / "run"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    trained = run_ranks(_fsdp_worker, WORLD, tmp_path / "a", "train", str(run_dir))
    resumed = run_ranks(_fsdp_worker, WORLD, tmp_path / "b", "resume", str(run_dir))
    path = run_dir / "checkpoints" / "step_00000003"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
            "state.pt",
            "rng_rank0.pt",
            "rng_rank1.pt",
            "MANIFEST.json",
            "COMPLETE",
        ]
    )
    assert not torch.equal(trained[0]["losses"][0], trained[1]["losses"][0])  # ranks differ
    for rank in range(WORLD):
        assert resumed[rank]["extra"]["loader"] == {"epoch": 0, "batch": 6}
        assert resumed[rank]["extra"]["step"] == 3
        for a, b in zip(resumed[rank]["losses"], trained[rank]["losses"]):
            assert torch.equal(a, b), f"rank {rank}: {a.item()} != {b.item()}"
        assert torch.equal(resumed[rank]["draw"][0], trained[rank]["draw"][0])
        assert resumed[rank]["draw"][1:] == trained[rank]["draw"][1:]

    # The sharded checkpoint loads into a plain model in this process (no process group).
    _assert_same(_load_params(run_dir), trained[0]["saved"])

"""The trainer: FSDP2 on 2 gloo ranks equals one process, non-finite steps are skipped, roll-back,
bad configs fail fast."""

import math
import os

import pytest
import torch

from declip_fast.train.config import load_config
from declip_fast.train.trainer import Trainer
from tests.distributed.launch import run_ranks
from tests.train.batches import GLOBAL_BATCH, synthetic_batch

STEPS = 5


def _config(tmp_path, *extra):
    return load_config(
        "demo",
        [
            f"run_dir={tmp_path / 'run'}",
            "data.beton=null",
            "eval.data=null",
            "progress=false",
            "tensorboard=false",
            "plot=false",
            "loss.queue_size=16",
            "optim.warmup_steps=2",
            f"steps={STEPS}",
            "checkpoint_every=1000",
            *extra,
        ],
    )


def _run(trainer, rank=0, world=1) -> list[dict]:
    rows = GLOBAL_BATCH // world
    out = []
    for step in range(STEPS):
        batch = {k: v[rank * rows : (rank + 1) * rows] for k, v in synthetic_batch(step).items()}
        out.append(trainer.step(batch))
    return out


def _fsdp_worker(rank, port, out_dir, config_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from pathlib import Path

        trainer = Trainer(_config(Path(config_dir) / f"r{rank}", f"data.batch_size={GLOBAL_BATCH // 2}")).build()
        assert type(trainer.model).__name__.startswith("FSDP"), "the model should be sharded"
        torch.save(_run(trainer, rank, 2), os.path.join(out_dir, f"rank{rank}.pt"))
        trainer.close()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_two_fsdp_ranks_follow_the_single_process_trajectory(tmp_path):
    single = Trainer(_config(tmp_path / "one")).build()
    reference = _run(single)
    single.close()
    ranks = run_ranks(_fsdp_worker, 2, tmp_path, str(tmp_path))
    assert "nns" in reference[-1], "the NNS queue should be in play by the last step"
    for term in ("mvs", "iss", "tss", "nns", "total"):
        for step, ref in enumerate(reference):
            if term not in ref:
                continue
            # Each rank's term covers its rows; gradient averaging = the mean of the ranks' values.
            mean = sum(r[step][term] for r in ranks) / 2
            if term in ("iss", "tss", "total"):
                assert abs(mean - ref[term]) < 1e-4, (term, step, mean, ref[term])
    # Every rank sees the whole trajectory of the shared quantities.
    for step, ref in enumerate(reference):
        for r in ranks:
            assert abs(r[step]["logit_scale"] - ref["logit_scale"]) < 1e-4
            assert abs(r[step]["grad_norm"] - ref["grad_norm"]) < 1e-4 * max(1.0, ref["grad_norm"])


def test_a_non_finite_loss_skips_the_update(tmp_path):
    trainer = Trainer(_config(tmp_path)).build()
    trainer.step(synthetic_batch(0))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    forward = trainer.loss_fn.forward

    def poisoned(features):
        losses = forward(features)
        losses["total"] = losses["total"] * float("nan")
        return losses

    trainer.loss_fn.forward = poisoned
    values = trainer.step(synthetic_batch(1))
    assert math.isnan(values["total"]) and values["skipped_steps"] == 1 and trainer.bad_in_a_row == 1
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} moved on a skipped step"
    assert all(
        s == {} or not any(torch.isnan(v).any() for v in s.values() if torch.is_tensor(v))
        for s in trainer.optimizer.state.values()
    )
    trainer.loss_fn.forward = forward
    values = trainer.step(synthetic_batch(2))
    assert math.isfinite(values["total"]) and trainer.bad_in_a_row == 0
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    trainer.close()


def test_a_non_finite_gradient_alone_is_caught(tmp_path):
    trainer = Trainer(_config(tmp_path)).build()
    param = trainer.model.logit_scale
    hook = param.register_hook(lambda g: g * float("inf"))
    values = trainer.step(synthetic_batch(0))
    hook.remove()
    assert math.isfinite(values["total"]) and not math.isfinite(values["grad_norm"])
    assert values["skipped_steps"] == 1
    trainer.close()


def test_the_loss_and_model_must_agree(tmp_path):
    with pytest.raises(ValueError, match="MLM head"):
        Trainer(_config(tmp_path, "model.preset=clip_tiny", "loss.iss=0", "loss.nns=0")).build()


class _HostReads(torch.overrides.TorchFunctionMode):
    """Records each read of tensor values into Python (``tolist``, ``item``, ``bool()``,
    ``float()``, ``int()``, ``numpy``: a device sync on a GPU) made by the library's own code,
    i.e. whose nearest caller outside torch is a file of declip_fast (reads inside torch, such as
    the optimizer's step counters on the host, are not ours to count)."""

    READS = {"tolist", "item", "__bool__", "__float__", "__int__", "__index__", "numpy"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            import sys

            frame = sys._getframe(1)
            while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
                frame = frame.f_back
            where = frame.f_code.co_filename if frame is not None else ""
            # The fused linear cross-entropy checks its targets on the host only for CPU tensors
            # (a free read there); on CUDA it uses torch._assert_async, which does not sync.
            # The trainer's _host_list reads the loader's caption lengths, which never leave the
            # host (the batch contract), into the list the packed text tower takes.
            cpu_only = frame is not None and frame.f_code.co_name in ("_check_range", "_host_list")
            if (f"{os.sep}declip_fast{os.sep}" in where or f"{os.sep}kernels{os.sep}" in where) and not cpu_only:
                self.calls.append(f"{name} at {where}:{frame.f_lineno}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("loss", ["released", "clip"])
def test_a_step_reads_the_device_once(tmp_path, loss):
    """Issue 19: one host sync per training step (the finite check, the losses, the logit scale
    and the gradient norm travel together); the values it returns are the step's own."""
    trainer = Trainer(_config(tmp_path, f"loss={loss}")).build()
    try:
        trainer.step(synthetic_batch(0))  # the first step may set things up
        with _HostReads() as reads:
            values = trainer.step(synthetic_batch(1))
    finally:
        trainer.close()
    assert len(reads.calls) == 1, reads.calls
    assert all(isinstance(v, (int, float)) for v in values.values())
    assert math.isfinite(values["total"]) and values["grad_norm"] > 0
    assert values["logit_scale"] == pytest.approx(float(trainer.model.logit_scale.detach().exp()), rel=1e-6)

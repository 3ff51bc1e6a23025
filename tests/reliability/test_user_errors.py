"""Every mistake a user can make after the command line parses is one line on stderr naming the
key or file, exit status 2, no traceback (``--debug`` shows it)."""

import subprocess
import sys

import pytest
import torch

from tests.reliability.conftest import run_cli

BASE = ["train", "demo", "data.beton=null", "progress=false", "tensorboard=false", "plot=false", "eval.data=null"]


def _not_a_beton(tmp_path):
    path = tmp_path / "fake.beton"
    path.write_bytes(b"image,caption\n" * 20)
    return f"data.beton={path}"


CASES = {  # id: (override(s), text the one line must hold)
    "nan lr": (["optim.lr=.nan"], "optim.lr must be a finite number"),
    "inf lr": (["optim.lr=.inf"], "optim.lr must be a finite number"),
    "zero lr": (["optim.lr=0"], "optim.lr must be > 0"),
    "nan loss weight": (["loss.mvs=.nan"], "loss.mvs must be a finite number"),
    "negative weight decay": (["optim.weight_decay=-0.1"], "optim.weight_decay must be >= 0"),
    "beta of 1": (["optim.betas=[0.9, 1.0]"], "optim.betas[1] must be < 1"),
    "max_bad_steps 0": (["max_bad_steps=0"], "max_bad_steps must be >= 1"),
    "logit scale min > max": (["optim.logit_scale_min=5"], "optim.logit_scale_min 5.0 is above optim.logit_scale_max"),
    "beton and source": (["data.beton=a.beton", "data.source=b.csv"], "data.beton (a.beton) and data.source (b.csv)"),
    "unknown model": (["model.preset=declip_huge"], "model.preset: unknown preset 'declip_huge'"),
    "image not a patch multiple": (
        ["model.overrides={vision: {image_size: 36}}"],
        "not a multiple of its patch size 8",
    ),
    "data image size": (["data.image_size=48"], "data.image_size 48 does not match the vision image_size 32"),
    "missing beton": (["data.beton=/nonexistent/train.beton"], "data.beton: /nonexistent/train.beton does not exist"),
    "wrong-format beton": (_not_a_beton, "is not an FFCV .beton file"),
    "missing resume path": (
        ["resume=/nonexistent/step_00000001"],
        "resume: checkpoint /nonexistent/step_00000001 does not exist",
    ),
    "unknown key": (["optim.lrr=1"], "optim.lrr"),
    "unchecked FFCV decoders": (
        ["data.ffcv_fused_views=false"],
        "data.ffcv_fused_views=false is for loader benchmarks only",
    ),
}
if not torch.cuda.is_available():
    CASES["cuda without CUDA"] = (["device=cuda"], "device=cuda, but no CUDA device")


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_line_exit_2(tmp_path, capsys, case):
    overrides, expected = CASES[case]
    if callable(overrides):
        overrides = [overrides(tmp_path)]
    status, err = run_cli(capsys, [*BASE, f"run_dir={tmp_path / 'run'}", *overrides])
    assert status == 2, (status, err)
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert "Traceback" not in err[0]
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_debug_shows_the_traceback(tmp_path, capsys):
    status, err = run_cli(capsys, [*BASE, f"run_dir={tmp_path}", "model.preset=declip_huge", "--debug"])
    assert status == 2 and err[0].startswith("Traceback") and err[-1].startswith("error: model.preset")


def test_the_installed_command_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "declip_fast.cli", *BASE, f"run_dir={tmp_path}", "data.beton=/nonexistent/train.beton"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: data.beton: /nonexistent/train.beton does not exist (declip-fast write-dataset writes one)"
    ]

"""The `demo` preset end to end, as `make demo` runs it: it must learn (zero-shot accuracy on the
Fashion-MNIST test split far above the 10% of chance) and leave a complete run folder."""

import json
from pathlib import Path

import pytest

from declip_fast.data.demo import ensure_demo_data
from declip_fast.train.config import load_config
from declip_fast.train.metrics import read_metrics
from declip_fast.train.trainer import train


@pytest.mark.slow
def test_demo_preset_learns_zero_shot(tmp_path):
    config = load_config("demo", [f"run_dir={tmp_path / 'run'}", "progress=false"])
    # What `make demo` does first: the files configs/demo.yaml names, built when missing.
    paths = ensure_demo_data(Path(config.data.beton).parent)
    assert (str(paths.train), str(paths.test), str(paths.classes)) == (
        config.data.beton,
        config.eval.data,
        config.eval.classes,
    )
    summary = train(config)
    run = tmp_path / "run"
    assert summary["status"] == "done" and summary["steps"] == config.steps
    top1 = summary["zeroshot"]["top1"]
    assert top1 > 0.4, f"zero-shot top-1 {top1:.1%} after the demo run (chance: 10%)"
    assert json.loads((run / "zeroshot.json").read_text())["top1"] == top1
    rows = read_metrics(run / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(1, config.steps + 1))
    assert rows[-1]["total"] < rows[0]["total"]
    for name in ("config.yaml", "curves.png", "tensorboard"):
        assert (run / name).exists(), name
    assert (run / "checkpoints" / f"step_{config.steps:08d}" / "COMPLETE").is_file()

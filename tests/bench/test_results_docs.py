"""The data-efficiency experiment end to end at smoke size, and the README's generated sections:
they must equal what benchmarks/readme.py builds from the committed results files."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import data_efficiency, readme

REPO = Path(__file__).resolve().parents[2]
TRAIN, TEST = 256, 64  # demo pairs for the smoke run


def test_readme_sections_match_committed_results():
    proc = subprocess.run(
        [sys.executable, "benchmarks/readme.py", "--check"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_render_replaces_only_between_markers(tmp_path):
    text = "intro\n<!-- generated:a -->\nold\n<!-- end:a -->\noutro\n"
    assert readme.render(text, {"a": "new\n"}) == "intro\n<!-- generated:a -->\nnew\n<!-- end:a -->\noutro\n"
    with pytest.raises(SystemExit, match="generated:b"):
        readme.render(text, {"b": "x"})


def test_summary_mean_and_spread():
    runs = [
        {"method": "clip", "fraction": 0.5, "seed": s, "top1": t, "top5": 0.9} for s, t in enumerate([0.2, 0.4, 0.9])
    ]
    (row,) = data_efficiency.summarize(runs)
    assert row["seeds"] == 3 and row["top1_min"] == 0.2 and row["top1_max"] == 0.9
    assert row["top1_mean"] == pytest.approx(0.5)
    assert row["top1_std"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from declip_fast.data.demo import ensure_demo_data

    out = tmp_path_factory.mktemp("demo")
    ensure_demo_data(out, train_size=TRAIN, test_size=TEST, workers=1)
    return out


@pytest.mark.slow
def test_data_efficiency_smoke(tmp_path, demo_data):
    # Two 2-step runs (CLIP and DeCLIP on 5% of the pairs, one seed): the files appear, each run
    # trained on its subset of the small demo folder (used as it is, not rebuilt at full size),
    # and a second call reads the runs back instead of retraining.
    args = [
        "--steps",
        "2",
        "--seeds",
        "0",
        "--fractions",
        "0.05",
        "--work",
        str(tmp_path / "runs"),
        "--out",
        str(tmp_path / "out"),
        "--demo-data",
        str(demo_data),
        "--name",
        "smoke",
        "--set",
        "data.batch_size=8",
        "data.num_workers=1",
        "loss.queue_size=64",
    ]
    result = data_efficiency.main(args)
    assert [(r["method"], r["fraction"], r["seed"]) for r in result["runs"]] == [("clip", 0.05, 0), ("declip", 0.05, 0)]
    for r in result["runs"]:
        assert 0.0 <= r["top1"] <= r["top5"] <= 1.0
        config = (Path(r["run_dir"]) / "config.yaml").read_text()
        assert "fraction: 0.05" in config
    assert {r["method"] for r in result["summary"]} == {"clip", "declip"}
    saved = json.loads((tmp_path / "out" / "smoke.json").read_text())
    assert saved["meta"]["test_images"] == TEST and saved["meta"]["train_pairs"] == TRAIN
    assert saved["meta"]["steps"] == 2
    table = (tmp_path / "out" / "smoke.md").read_text()
    assert f"| 5% | {round(0.05 * TRAIN)} |" in table
    assert (tmp_path / "out" / "smoke.png").stat().st_size > 0
    again = data_efficiency.main(args)  # read back from zeroshot.json, not retrained
    assert [r["top1"] for r in again["runs"]] == [r["top1"] for r in result["runs"]]
    assert "train_s" in again["runs"][0]

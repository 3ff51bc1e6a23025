"""The clip-art CLIP vs DeCLIP experiment (benchmarks/clipart_efficiency.py) end to end at smoke
size on a small slice of the clip-art set, and its summary arithmetic."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks import clipart_efficiency

HAVE_PACKAGES = shutil.which("rsvg-convert") is not None and Path("/usr/share/openclipart/svg").is_dir()
SLICE = 60  # clip-art files rendered for the smoke run


def test_summary_mean_range_and_standard_error():
    values = [0.2, 0.4, 0.9]
    runs = [
        {"method": "declip", "fraction": 0.25, "seed": s, **dict.fromkeys(clipart_efficiency.METRICS, v)}
        for s, v in enumerate(values)
    ]
    runs.append({"method": "clip", "fraction": 0.25, "seed": 0, **dict.fromkeys(clipart_efficiency.METRICS, 0.5)})
    rows = clipart_efficiency.summarize(runs, ["clip", "declip"])
    assert [r["method"] for r in rows] == ["clip", "declip"]
    clip, declip = rows
    assert clip["balanced_top1_se"] is None and clip["top1_mean"] == 0.5  # one seed: no spread
    for metric in clipart_efficiency.METRICS:
        assert declip[f"{metric}_mean"] == pytest.approx(0.5)
        assert (declip[f"{metric}_min"], declip[f"{metric}_max"]) == (0.2, 0.9)
        assert declip[f"{metric}_se"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(3))
    assert "50.0 ±" in clipart_efficiency.markdown(
        {
            "meta": {
                "steps": 1,
                "batch_size": 1,
                "image_size": 32,
                "seeds": [0, 1, 2],
                "device": "CPU",
                "date": "today",
                "commit": "abc",
                "train_pairs": 100,
                "test_images": 10,
                "classes": 2,
                "retrieval_images": 5,
                "retrieval_texts": 5,
            },
            "summary": rows,
        }
    )


def test_grid_has_thirty_runs_with_ablations_at_the_smallest_fraction():
    jobs = clipart_efficiency.grid([0, 1, 2], [0.25, 0.5, 1.0], ablations=True)
    assert len(jobs) == 30
    assert {f for m, f, _ in jobs if m in clipart_efficiency.ABLATIONS} == {0.25}
    assert len(clipart_efficiency.grid([0, 1, 2], [0.25, 0.5, 1.0], ablations=False)) == 18


@pytest.fixture(scope="module")
def clipart_slice(tmp_path_factory):
    if not HAVE_PACKAGES:
        pytest.skip("needs Debian's openclipart-svg and librsvg2-bin (scripts/setup.sh installs them)")
    pytest.importorskip("ffcv")
    from declip_fast.data.clipart import ensure_clipart_data

    out = tmp_path_factory.mktemp("clipart")
    ensure_clipart_data(out, limit=SLICE, workers=2)
    return out


@pytest.mark.slow
def test_clipart_efficiency_smoke(tmp_path, clipart_slice):
    # CLIP and DeCLIP plus the four ablations, all of the slice (the smallest fraction given, so
    # the ablations run there too), 2 steps, one seed, on the slice (used as it is, not rebuilt at
    # full size); a second call reads every run back. One fraction keeps CI's share small.
    args = [
        "--steps",
        "2",
        "--seeds",
        "0",
        "--fractions",
        "1.0",
        "--data",
        str(clipart_slice),
        "--work",
        str(tmp_path / "runs"),
        "--out",
        str(tmp_path / "out"),
        "--name",
        "smoke",
        "--set",
        "data.batch_size=4",
        "data.num_workers=1",
        "loss.queue_size=64",
    ]
    result = clipart_efficiency.main(args)
    ablations = list(clipart_efficiency.ABLATIONS)
    expected = {(m, 1.0) for m in ("clip", "declip", *ablations)}
    assert {(r["method"], r["fraction"]) for r in result["runs"]} == expected
    saved = json.loads((tmp_path / "out" / "smoke.json").read_text())
    assert {(r["method"], r["fraction"]) for r in saved["summary"]} == expected
    for row in saved["summary"]:
        for metric in clipart_efficiency.METRICS:
            for stat in ("mean", "min", "max"):
                value = row[f"{metric}_{stat}"]
                assert math.isfinite(value) and 0.0 <= value <= 1.0, (row["method"], metric, stat, value)
    for run in saved["runs"]:
        assert run["steps"] == 2 and all(0.0 <= run[m] <= 1.0 for m in clipart_efficiency.METRICS)
    meta = saved["meta"]
    assert meta["train_pairs"] > 0 and meta["test_images"] == len(np.load(clipart_slice / "test_labels.npy"))
    assert meta["data_build"]["limit"] == SLICE  # the slice, not a full build
    # each ablation trained what it says: the term off, the unused head not built
    runs = {r["method"]: Path(r["run_dir"]) for r in result["runs"]}
    from declip_fast.eval.cli import load_model

    assert load_model(runs["declip-no-iss"]).projector is None
    assert load_model(runs["declip-no-tss"]).mlm_head is None
    assert load_model(runs["declip"]).projector is not None
    for name, term in (("declip-no-mvs", "mvs"), ("declip-no-nns", "nns"), ("clip", "iss")):
        columns = (runs[name] / "metrics.csv").read_text().splitlines()[0].split(",")
        assert term not in columns, (name, columns)
    table = (tmp_path / "out" / "smoke.md").read_text()
    assert "| DeCLIP w/o MVS | 100% |" in table and "text->image R@1" in table
    assert (tmp_path / "out" / "smoke.png").stat().st_size > 0
    again = clipart_efficiency.main(args)  # read back from zeroshot.json / retrieval.json
    assert [(r["top1"], r["t2i_R@5"]) for r in again["runs"]] == [(r["top1"], r["t2i_R@5"]) for r in result["runs"]]
    assert all("train_s" in r for r in again["runs"])

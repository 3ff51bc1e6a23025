"""The benchmark plumbing: ``make bench``'s driver (benchmarks/run.py) writes a results file with
the machine's description and the run's tables, benchmarks/report.py turns it into the ratio
table and plots (and refuses other files), and ``gpu_suite.sh --dry-run`` finds everything a GPU
box will run. The results file comes from a real, cut-down benchmark run (bench_clip_loss at
N = 256), so the schema tested is the one pytest-benchmark and the conftest hooks produce."""

import copy
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import report, run

REPO = Path(__file__).resolve().parents[2]
PARTS = ["peaks", "tests", "contrastive", "lookup", "attention", "towers", "train"]


def _env(**extra):
    """The environment of `make bench`: no Triton interpreter (tests/conftest.py sets it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, "PYTHON": sys.executable, **extra}


def _suite(*args, **env):
    return subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", *args],
        cwd=REPO,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A results file from the driver, with its report written next to it."""
    path = tmp_path_factory.mktemp("bench") / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--json", str(path), "benchmarks/bench_clip_loss.py"],
        cwd=REPO,
        env=_env(BENCH_CLIP_LOSS_N="256"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return path, proc.stdout


@pytest.mark.slow
def test_gpu_suite_dry_run_finds_every_part():
    proc = _suite("--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for part in PARTS:
        assert f"dry-run: {part} ok" in proc.stdout, proc.stdout
    assert "all parts found" in proc.stdout


def test_gpu_suite_dry_run_fails_on_what_is_missing():
    proc = _suite("peaks", "no-such-part", DRY_RUN="1")  # the environment form
    assert proc.returncode != 0
    assert "dry-run: peaks ok" in proc.stdout and "no-such-part: unknown part" in proc.stdout


@pytest.mark.slow
def test_results_file_records_machine_and_tables(results):
    path, stdout = results
    data = json.loads(path.read_text())
    info = data["machine_info"]
    assert info["device"] and info["device_slug"] and info["cpu_count"] == os.cpu_count()
    if not torch.cuda.is_available():
        assert info["device_slug"] == "cpu"
    assert info["torch"] == torch.__version__ and "triton" in info and "cuda_driver" in info
    assert info["python"] == platform.python_version()
    datetime.date.fromisoformat(info["date"])
    if (REPO / ".git").exists():
        assert len(info["git_commit"]) == 40 and isinstance(info["git_dirty"], bool)
    entries = {e["params"]["impl"]: e for e in data["benchmarks"]}
    assert set(entries) == {"ours", "open_clip"}
    assert all(
        e["extra_info"]["n"] == 256 and isinstance(e["extra_info"]["peak_extra_bytes"], int) for e in entries.values()
    )
    (table,) = [rows for name, rows in data["tables"].items() if name.startswith("ClipLoss")]
    assert table[0]["N"] == 256
    # The driver printed the one ratio table and wrote the report next to the file.
    assert "## Ratios against peers" in stdout and "OpenCLIP ClipLoss" in stdout
    assert path.with_suffix(".md").exists() and path.with_name("results-loss.png").exists()


@pytest.mark.slow
def test_report_writes_table_and_plots(results, tmp_path):
    path, _ = results
    proc = subprocess.run(
        [sys.executable, "benchmarks/report.py", str(path), "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(path.read_text())["machine_info"]
    md = (tmp_path / "results.md").read_text()
    headings = [line for line in md.splitlines() if line.startswith("#")]
    assert info["device"] in headings[0] and all(info["date"] in h for h in headings)  # each table says where
    assert info["git_commit"] is None or info["git_commit"] in md
    assert f"torch {info['torch']}" in md
    row = next(line for line in md.splitlines() if "OpenCLIP ClipLoss" in line)
    assert "N=256" in row and row.count("|") == 10  # nine columns
    assert "## Ratios against peers" in proc.stdout
    assert (tmp_path / "results-loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "no lookup measurements" in proc.stdout  # the CPU run had no lookup: said, not crashed


@pytest.mark.slow
def test_lookup_plot_and_ratios(results, tmp_path):
    """bench_nn_lookup entries (the real entries' schema, relabelled) at two queue sizes."""
    path, _ = results
    data = json.loads(path.read_text())
    template, lookups = data["benchmarks"][0], []
    for m in (65536, 1048576):
        for impl, seconds, extra in (("torch", 2.0, 2**30), ("faiss", 1.5, 2**20), ("ours", 1.0, 2**19)):
            entry = copy.deepcopy(template)
            entry["fullname"] = f"benchmarks/bench_nn_lookup.py::test_nn_lookup[1024-{m}-128-{impl}]"
            entry["params"] = {"b": 1024, "m": m, "d": 128, "impl": impl}
            entry["extra_info"] = {
                "impl": impl,
                "dtype": "float32",
                "median_s": seconds * m / 65536,
                "peak_extra_bytes": extra,
            }
            lookups.append(entry)
    data["benchmarks"] = lookups
    (tmp_path / "lookup.json").write_text(json.dumps(data))
    written = report.write_report(tmp_path / "lookup.json")
    assert tmp_path / "lookup-lookup.png" in written
    rows = report.ratio_rows(data)
    assert [(r["peer"], r["time"]) for r in rows[:2]] == [("torch matmul+max", 0.5), ("faiss IndexFlatIP", 1 / 1.5)]


@pytest.mark.slow
def test_merge_keeps_every_part(results, tmp_path):
    """gpu_suite.sh merges its parts' files (and the device peaks) into one results file."""
    path, _ = results
    peaks = tmp_path / "peaks.json"
    peaks.write_text(json.dumps({"bf16_matmul_tflops": 700.0, "copy_gb_s": 3000.0}))
    merged = run.merge([path, path], peaks)
    single = json.loads(path.read_text())
    assert len(merged["benchmarks"]) == 2 * len(single["benchmarks"])
    assert all(len(merged["tables"][k]) == 2 * len(v) for k, v in single["tables"].items())
    assert "bf16 matmul 700 TFLOP/s" in report.markdown(merged, "merged.json")


def test_report_refuses_other_files(tmp_path):
    not_json, not_results = tmp_path / "notes.txt", tmp_path / "peaks.json"
    not_json.write_text("hello")
    not_results.write_text(json.dumps({"bf16_matmul_tflops": 700.0}))
    for path in (not_json, not_results, tmp_path / "missing.json"):
        proc = subprocess.run(
            [sys.executable, "benchmarks/report.py", str(path)], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode != 0 and proc.stderr.startswith(f"report.py: {path}"), proc.stderr
        assert "Traceback" not in proc.stderr

"""``make bench``: run the benchmark suites, write one results file, print the ratio table.

Usage:
  python -m benchmarks.run [--json PATH] [PYTEST ARGS...]
      Runs every benchmarks/bench_*.py (or the paths / ``-k`` filter given; other arguments go
      to pytest); suites that need CUDA skip themselves on a CPU. Writes PATH (default
      ``benchmarks/results/<date>-<device>.json``, device ``cpu`` or the GPU's slug, e.g. ``h100``),
      then the report next to it (benchmarks/report.py: the ratio table, printed and as .md,
      and the plots). The exit code is pytest's.
  python -m benchmarks.run --merge A.json B.json ... [--json PATH] [--peaks PEAKS.json]
      Merges results files of one machine (gpu_suite.sh runs each part in its own pytest) into
      one, with the device peaks (benchmarks/device_peaks.py) attached if given; default PATH
      ``<A's folder>/<date>-<device>.json``; then the same report.

The results file is pytest-benchmark's JSON; benchmarks/conftest.py adds the machine's
description (``machine_info``) and the printed tables (``tables``), so one file holds the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

from benchmarks import report

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
# The suites are bench_*.py, not test_*.py: they never run with the unit tests.
PYTEST_ARGS = ["-q", "-p", "no:cacheprovider", "--benchmark-columns=median,rounds", "-o", "python_files=bench_*.py"]


def run_suite(pytest_args: list[str], json_path: Path) -> tuple[int, bool]:
    """Run pytest on the benchmarks (all of them unless paths are given): pytest's exit code and
    whether ``json_path`` was written.

    pytest-benchmark writes to a side file that replaces ``json_path`` only if the run measured
    something, so a failed run does not destroy an earlier result of the same day.
    """
    given = any((REPO / arg.split("::")[0]).exists() for arg in pytest_args if not arg.startswith("-"))
    partial = json_path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *([] if given else ["benchmarks"]),
        *PYTEST_ARGS,
        f"--benchmark-json={partial}",
        *pytest_args,
    ]
    code = subprocess.run(cmd, cwd=REPO).returncode
    if not partial.exists():  # pytest-benchmark writes nothing when no benchmark ran
        return code, False
    partial.replace(json_path)
    return code, True


def merge(paths: list[Path], peaks: Path | None = None) -> dict:
    """One results file from several of the same machine: benchmarks and tables concatenated,
    the first file's machine and commit kept."""
    files = [report.load(path) for path in paths]
    merged = {**files[0], "benchmarks": [e for f in files for e in f["benchmarks"]], "tables": {}}
    for f in files:
        for name, rows in f.get("tables", {}).items():
            merged["tables"].setdefault(name, []).extend(rows)
    merged["merged_from"] = [path.name for path in paths]
    if peaks:
        merged["peaks"] = json.loads(peaks.read_text())
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        allow_abbrev=False,
        epilog="Other arguments go to pytest, e.g. `-k masking` or a bench file.",
    )
    parser.add_argument("--json", type=Path, help="the results file to write")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="RESULTS", help="merge these instead of running")
    parser.add_argument("--peaks", type=Path, help="with --merge: device_peaks.py's JSON to attach")
    args, pytest_args = parser.parse_known_args(argv)

    if args.merge:
        if pytest_args:
            parser.error(f"--merge runs nothing; unexpected {' '.join(pytest_args)}")
        data = merge(args.merge, args.peaks)
        info = data["machine_info"]
        path = args.json or args.merge[0].parent / f"{info.get('date')}-{info.get('device_slug', 'unknown')}.json"
        path.write_text(json.dumps(data, indent=2))
        code = 0
    else:
        if args.peaks:
            parser.error("--peaks goes with --merge")
        from benchmarks.machine import device_slug

        path = (args.json or RESULTS / f"{datetime.date.today()}-{device_slug()}.json").resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        code, written = run_suite(pytest_args, path)
        if not written:
            print(f"no benchmark was measured: {path} not written")
            return code or 1
    report.write_report(path)
    return code


if __name__ == "__main__":
    sys.exit(main())

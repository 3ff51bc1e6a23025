#!/usr/bin/env python3
"""Rebuild the README's Performance and Results sections from the committed results files.

    .venv/bin/python benchmarks/readme.py           # rewrite README.md in place
    .venv/bin/python benchmarks/readme.py --check   # exit 1 when README.md is out of date (a test runs this)

Each section sits between ``<!-- generated:NAME -->`` and ``<!-- end:NAME -->`` in README.md;
what is between is replaced, nothing else is touched. Sources, in ``benchmarks/results/``:

- ``performance``: for each device, the newest ``<date>-<device>.json`` (``make bench`` or
  ``benchmarks/gpu_suite.sh``): the ratio table of ``report.py`` and its plots, named by device
  and date;
- ``results``: the newest ``data_efficiency-<date>-<device>.json``
  (``benchmarks/data_efficiency.py``): its table and plot;
- ``clipart``: the newest ``clipart_efficiency-<date>-<device>.json``
  (``benchmarks/clipart_efficiency.py``): its zero-shot and retrieval tables and plot;
- ``step``: for each device, the newest ``step-<date>-<device>.json``
  (``python -m benchmarks.run --json benchmarks/results/step-<date>-<device>.json
  benchmarks/bench_step.py``): every table the whole-step benchmark printed.

So every number in those sections comes from a file a command wrote, never from typing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(ROOT))

from benchmarks import clipart_efficiency, data_efficiency, report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BENCH_FILE = re.compile(r"^(\d{4}-\d{2}-\d{2})-([a-z0-9-]+)\.json$")


def newest_per_device(folder: Path) -> list[Path]:
    """The newest ``<date>-<device>.json`` of each device, CPU first."""
    newest: dict[str, tuple[str, Path]] = {}
    for path in folder.glob("*.json"):
        match = BENCH_FILE.match(path.name)
        if match and (match[2] not in newest or match[1] > newest[match[2]][0]):
            newest[match[2]] = (match[1], path)
    return [newest[d][1] for d in sorted(newest, key=lambda d: (d != "cpu", d))]


def performance(folder: Path) -> str:
    parts = []
    for path in newest_per_device(folder):
        data = report.load(path)
        table = report.ratio_markdown(data).replace("## ", "### ", 1)
        rel = path.relative_to(ROOT)
        parts.append(f"{table}\nFrom `{rel}` (`benchmarks/report.py {rel}` prints this table and the full report).\n")
        for suffix in ("loss", "lookup"):
            png = path.with_name(f"{path.stem}-{suffix}.png")
            if png.exists():
                parts.append(f"![{suffix}: {report.where(data)}]({png.relative_to(ROOT)})\n")
    return "\n".join(parts) if parts else "No benchmark results are committed yet: `make bench` writes them.\n"


def _experiment(folder: Path, prefix: str, module, missing: str, alt: str) -> str:
    """The newest ``<prefix>-*.json``'s table (``module.markdown``) and plot, or ``missing``."""
    files = sorted(folder.glob(f"{prefix}-*.json"))
    if not files:
        return missing
    path = files[-1]
    rel = path.relative_to(ROOT)
    text = module.markdown(json.loads(path.read_text())) + f"\nFrom `{rel}` (`benchmarks/{prefix}.py`).\n"
    png = path.with_suffix(".png")
    if png.exists():
        text += f"\n![{alt}]({png.relative_to(ROOT)})\n"
    return text


def results(folder: Path) -> str:
    missing = "No data-efficiency results are committed yet: `benchmarks/data_efficiency.py` writes them.\n"
    return _experiment(folder, "data_efficiency", data_efficiency, missing, "data efficiency")


def clipart(folder: Path) -> str:
    missing = (
        "The CLIP vs DeCLIP grid on the clip-art set is not run yet: `benchmarks/clipart_efficiency.py` "
        "writes its results.\n"
    )
    return _experiment(folder, "clipart_efficiency", clipart_efficiency, missing, "clip-art CLIP vs DeCLIP")


STEP_FILE = re.compile(r"^step-(\d{4}-\d{2}-\d{2})-([a-z0-9-]+)\.json$")


def step(folder: Path) -> str:
    newest: dict[str, tuple[str, Path]] = {}
    for path in folder.glob("step-*.json"):
        match = STEP_FILE.match(path.name)
        if match and (match[2] not in newest or match[1] > newest[match[2]][0]):
            newest[match[2]] = (match[1], path)
    parts = []
    for device in sorted(newest, key=lambda d: (d != "cpu", d)):
        path = newest[device][1]
        data = report.load(path)
        for name, rows in data.get("tables", {}).items():
            parts.append("\n".join([f"#### {name} ({report.where(data)})", "", *report._md_table(rows), ""]))
        rel = path.relative_to(ROOT)
        parts.append(f"From `{rel}` (`benchmarks/bench_step.py`).\n")
    return (
        "\n".join(parts)
        if parts
        else "No whole-step results are committed yet: `benchmarks/bench_step.py` writes them.\n"
    )


def render(readme: str, sections: dict[str, str]) -> str:
    for name, body in sections.items():
        start, end = f"<!-- generated:{name} -->", f"<!-- end:{name} -->"
        if start not in readme or end not in readme:
            raise SystemExit(f"readme.py: README.md lacks the markers {start} ... {end}")
        head, rest = readme.split(start, 1)
        readme = f"{head}{start}\n{body.strip()}\n{end}{rest.split(end, 1)[1]}"
    return readme


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether README.md is up to date")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    current = args.readme.read_text()
    sections = {
        "performance": performance(RESULTS),
        "results": results(RESULTS),
        "clipart": clipart(RESULTS),
        "step": step(RESULTS),
    }
    wanted = render(current, sections)
    if args.check:
        if wanted != current:
            print("README.md is out of date with benchmarks/results: run benchmarks/readme.py")
            return 1
        return 0
    args.readme.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())

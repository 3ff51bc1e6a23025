"""DeCLIP's data-efficiency claim in miniature: tiny CLIP and DeCLIP on 5%, 20% and 100% of the
demo's training pairs, same steps, same seeds, zero-shot top-1 on the demo's test split.

    .venv/bin/python benchmarks/data_efficiency.py                  # the full grid, ~1 h on 2 cores
    .venv/bin/python benchmarks/data_efficiency.py --steps 3 --seeds 0 --fractions 0.05 1.0  # smoke
    .venv/bin/python benchmarks/data_efficiency.py --set data.batch_size=64 optim.lr=5e-4    # any key

Every run is the ``demo`` preset (``configs/demo.yaml``) with overrides: ``model.preset``
``declip_tiny`` + the released objective, or ``clip_tiny`` + ``loss=clip``; ``data.fraction`` with
``data.fraction_seed`` = the run's seed (so the spread covers both the subset drawn and the
initialisation; CLIP and DeCLIP of one seed see the same pairs); ``seed``. One run per (method,
fraction, seed) in ``--work/<method>-<fraction>-s<seed>``; a run that already has its
``zeroshot.json`` is read, not repeated (an interrupted grid resumes where it stopped, and a run
killed midway resumes from its last checkpoint).

Writes ``--out/data_efficiency-<date>-cpu.{json,md,png}``: every run's top-1 / top-5, the mean
and spread (min..max and sample standard deviation over seeds) per (method, fraction), and the
plot of top-1 against the fraction of data, one line per method (mean, with a band from the
lowest to the highest seed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name, git_state  # noqa: E402

METHODS = {  # name: overrides of the demo preset
    "clip": ["model.preset=clip_tiny", "loss=clip"],
    "declip": ["model.preset=declip_tiny"],
}


def run_one(
    method: str, fraction: float, seed: int, steps: int, work: Path, demo_data: str, extra: list[str] = ()
) -> dict:
    """Train (or read back) one run; returns its record."""
    from declip_fast.train.config import load_config
    from declip_fast.train.trainer import train

    run_dir = work / f"{method}-{fraction:g}-s{seed}"
    done = run_dir / "zeroshot.json"
    record = {"method": method, "fraction": fraction, "seed": seed, "steps": steps, "run_dir": str(run_dir)}
    if not done.exists():
        overrides = METHODS[method] + [
            f"run_dir={run_dir}",
            f"steps={steps}",
            f"seed={seed}",
            f"data.fraction={fraction}",
            f"data.fraction_seed={seed}",
            f"demo_data={demo_data}",
            f"checkpoint_every={max(1, steps // 2)}",
            "progress=false",
            "tensorboard=false",
            "plot=false",
            *extra,
        ]
        start = time.perf_counter()
        summary = train(load_config("demo", overrides))
        record["train_s"] = time.perf_counter() - start
        if summary["status"] != "done":
            raise RuntimeError(f"{run_dir}: training stopped ({summary['status']})")
        (run_dir / "run_time.json").write_text(json.dumps({"train_s": record["train_s"]}) + "\n")
    elif (run_dir / "run_time.json").exists():
        record.update(json.loads((run_dir / "run_time.json").read_text()))
    scores = json.loads(done.read_text())
    record.update(top1=scores["top1"], top5=scores["top5"])
    return record


def summarize(records: list[dict]) -> list[dict]:
    """Mean and spread of top-1 / top-5 over seeds, per (method, fraction)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["fraction"]), []).append(r)
    rows = []
    for (method, fraction), runs in sorted(groups.items()):
        top1 = [r["top1"] for r in runs]
        top5 = [r["top5"] for r in runs]
        rows.append(
            {
                "method": method,
                "fraction": fraction,
                "seeds": len(runs),
                "top1_mean": statistics.fmean(top1),
                "top1_min": min(top1),
                "top1_max": max(top1),
                "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                "top5_mean": statistics.fmean(top5),
            }
        )
    return rows


def markdown(result: dict) -> str:
    """The table of a results file (also used by ``benchmarks/report.py``)."""
    meta = result["meta"]
    lines = [
        f"Zero-shot top-1 (%) on the demo test split ({meta['test_images']} images, 10 classes), "
        f"{meta['steps']} steps of batch {meta['batch_size']}, mean over seeds {meta['seeds']} "
        f"(min..max); {meta['device']}, {meta['date']}, commit {meta['commit']}.",
        "",
        "| fraction of pairs | pairs | " + " | ".join(meta["methods"]) + " |",
        "|---:|---:|" + "---:|" * len(meta["methods"]),
    ]
    by = {(r["method"], r["fraction"]): r for r in result["summary"]}
    for fraction in meta["fractions"]:
        cells = []
        for method in meta["methods"]:
            r = by.get((method, fraction))
            cells.append(
                ""
                if r is None
                else f"{100 * r['top1_mean']:.1f} ({100 * r['top1_min']:.1f}..{100 * r['top1_max']:.1f})"
            )
        pairs = round(fraction * meta["train_pairs"])
        lines.append(f"| {100 * fraction:g}% | {pairs:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = result["meta"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method in meta["methods"]:
        rows = sorted((r for r in result["summary"] if r["method"] == method), key=lambda r: r["fraction"])
        x = [100 * r["fraction"] for r in rows]
        ax.plot(x, [100 * r["top1_mean"] for r in rows], marker="o", label=method)
        ax.fill_between(x, [100 * r["top1_min"] for r in rows], [100 * r["top1_max"] for r in rows], alpha=0.2)
    ax.set_xscale("log")
    ax.set_xticks([100 * f for f in meta["fractions"]], [f"{100 * f:g}%" for f in meta["fractions"]])
    ax.set_xlabel("fraction of the demo training pairs")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_title(
        f"Tiny presets, {meta['steps']} steps, mean of {len(meta['seeds'])} seeds (band: lowest..highest)\n"
        f"{meta['device']}, {meta['date']}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_overrides_argument(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE ...``: overrides of the demo preset for every run of an experiment."""
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="more overrides of the demo preset for every run, e.g. data.batch_size=64",
    )


def run_meta(date: str) -> dict:
    """Where and from what an experiment ran: the date, this CPU and the commit."""
    commit, dirty = git_state()
    return {
        "date": date,
        "device": f"CPU ({os.cpu_count()} cores, {cpu_name()})",
        "commit": (commit or "unknown")[:7] + (" (uncommitted changes)" if dirty else ""),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.2, 1.0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "data_efficiency")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--demo-data", default=str(ROOT / "data" / "demo"))
    parser.add_argument("--name", default=None, help="output stem (default data_efficiency-<date>-cpu)")
    add_overrides_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import numpy as np

    from declip_fast.data import demo
    from declip_fast.train.config import load_config

    demo.ensure_demo_data(args.demo_data, any_build=True)
    base = load_config("demo", args.set)
    records = []
    for seed in args.seeds:  # seeds outermost: a partial grid still compares the methods
        for fraction in args.fractions:
            for method in args.methods:
                record = run_one(method, fraction, seed, args.steps, args.work, args.demo_data, args.set)
                print(
                    f"{method:7s} fraction {fraction:<5g} seed {seed}: top-1 {100 * record['top1']:.1f}% "
                    f"top-5 {100 * record['top5']:.1f}%",
                    flush=True,
                )
                records.append(record)
    date = datetime.date.today().isoformat()
    meta = {
        **run_meta(date),
        "steps": args.steps,
        "seeds": args.seeds,
        "fractions": args.fractions,
        "methods": args.methods,
        "batch_size": base.data.batch_size,
        "train_pairs": len(np.load(Path(args.demo_data) / "train_labels.npy")),
        "test_images": len(np.load(Path(args.demo_data) / "test_labels.npy")),
    }
    result = {"meta": meta, "runs": records, "summary": summarize(records)}
    return write_result(result, args.out / (args.name or f"data_efficiency-{date}-cpu"), markdown, plot)


def write_result(result: dict, stem: Path, to_markdown, to_plot) -> dict:
    """``stem``.json, .md (``to_markdown(result)``, also printed) and .png (``to_plot``)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(result))
    to_plot(result, stem.with_suffix(".png"))
    print(to_markdown(result))
    print(f"wrote {stem}.json, .md, .png")
    return result


if __name__ == "__main__":
    main()

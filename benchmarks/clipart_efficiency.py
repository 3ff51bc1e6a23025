"""CLIP vs DeCLIP on the clip-art set: tiny CLIP and DeCLIP on 25%, 50% and 100% of the clip-art
training pairs, same steps, same seeds, scored by zero-shot classification and image-text
retrieval; at the smallest fraction, DeCLIP with each of its extra terms removed in turn.

    .venv/bin/python benchmarks/clipart_efficiency.py                  # the full grid, 30 runs, ~1.5 h on 2 cores
    .venv/bin/python benchmarks/clipart_efficiency.py --steps 3 --seeds 0 --fractions 0.25 1.0  # smoke
    .venv/bin/python benchmarks/clipart_efficiency.py --no-ablations --set data.batch_size=64   # any key

Data: ``--data`` (default ``data/clipart``), the folder ``declip-fast write-dataset --clipart DIR``
writes (``declip_fast.data.clipart.ensure_clipart_data``): built first when it has no
``classes.json`` (written last, so its presence means a complete folder; a ``--limit`` slice is
used as it is, not rebuilt), about 80 s on 2 cores. Training reads ``train.beton``; zero-shot
reads ``test.beton`` + ``test_labels.npy`` with the 19 classes and prompts of ``classes.json``
(unbalanced: 40 to 150+ images a class, hence balanced top-1 beside top-1); retrieval reads
``retrieval.csv`` (held-out pairs from other caption groups than train).

Every run is :func:`benchmarks.data_efficiency.run_one`: the ``demo`` preset (``configs/demo.yaml``:
its steps, batch, 32 px crops of the 64 px renders, optimizer) with overrides, the data folder in
place of the demo's; ``model.preset`` ``declip_tiny`` + the released objective (0.4 MVS + 0.2 (ISS
+ TSS + NNS)), or ``clip_tiny`` + ``loss=clip``; ``data.fraction`` with ``data.fraction_seed`` =
the run's seed (CLIP and DeCLIP of one seed see the same pairs); ``seed``. The ablations
(:data:`ABLATIONS`, at the smallest fraction, every seed) are DeCLIP with one term's weight at 0:

- ``declip-no-iss``: ``loss.iss=0`` and the model built without its SimSiam heads
  (``model.overrides.simsiam=null``), so no parameter sits unused; MVS still takes two image views;
- ``declip-no-tss``: ``loss.tss=0`` and no MLM head (``model.overrides.mlm=false``; no masked
  captions are then loaded);
- ``declip-no-mvs``: ``loss.mvs=0`` with its 0.4 moved to the single-pair CLIP term
  (``loss.clip=0.4``): the image-text contrastive signal stays, on one (image view 1, text view 1)
  pair instead of all four; ISS keeps its two image views (``DeCLIPLoss.needs``: two image views
  while ISS is on, one text view without MVS, so no EDA captions);
- ``declip-no-nns``: ``loss.nns=0`` (no neighbour queue).

One run per (method, fraction, seed) in ``--work/<method>-<fraction>-s<seed>`` (ablations in
``--work/<ablation>/declip-<fraction>-s<seed>``); a run with its ``zeroshot.json`` is not
retrained, and one with its ``retrieval.json`` not re-scored, so an interrupted grid resumes where
it stopped (a run killed midway resumes from its last checkpoint).

Scores per run: zero-shot top-1, balanced top-1 (mean per-class recall) and top-5 from the
trainer's end-of-run evaluation (``zeroshot.json``, ``declip_fast.eval.zeroshot``); image->text
and text->image recall@1/5/10 on ``retrieval.csv`` (``declip_fast.eval.retrieval.retrieval_eval``)
of the model loaded from the run folder as ``declip-fast eval`` loads it. No linear probe: the
clip-art training pairs have captions but no class labels (only the zero-shot test split is
labelled), so there is nothing to fit a probe on that is not the test set.

Writes ``--out/clipart_efficiency-<date>-cpu.{json,md,png}``: every run's scores; per (method,
fraction) every metric's mean, min..max and standard error (sample standard deviation / sqrt(n))
over seeds; two tables (:func:`markdown`) and the plot of zero-shot balanced top-1 and
text->image R@5 against the fraction of pairs, one line per method (band: lowest..highest seed),
the ablations as points at the smallest fraction.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(ROOT))

from benchmarks import data_efficiency  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("clip", "declip")  # data_efficiency.METHODS: the overrides of each
ABLATIONS = {  # name: overrides on top of DeCLIP's (module docstring)
    "declip-no-iss": ["loss.iss=0", "model.overrides.simsiam=null"],
    "declip-no-tss": ["loss.tss=0", "model.overrides.mlm=false"],
    "declip-no-mvs": ["loss.mvs=0", "loss.clip=0.4"],
    "declip-no-nns": ["loss.nns=0"],
}
LABELS = {
    "clip": "CLIP",
    "declip": "DeCLIP",
    "declip-no-iss": "DeCLIP w/o ISS",
    "declip-no-tss": "DeCLIP w/o TSS",
    "declip-no-mvs": "DeCLIP w/o MVS",
    "declip-no-nns": "DeCLIP w/o NNS",
}
ZEROSHOT = ("top1", "balanced_top1", "top5")
RETRIEVAL = tuple(f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))
METRICS = ZEROSHOT + RETRIEVAL
# Seconds per training step at batch 128 on 2 cores when no data_efficiency results say better;
# EVAL_S: building, zero-shot and retrieval scoring of one run.
STEP_S, EVAL_S = {"clip": 0.3, "declip": 0.7}, 15.0


def run_one(method: str, fraction: float, seed: int, steps: int, work: Path, data: Path, extra=(), pairs=None) -> dict:
    """Train (or read back) one run and score it (or read its scores back); returns its record."""
    base = "declip" if method in ABLATIONS else method
    folder = work / method if method in ABLATIONS else work
    with warnings.catch_warnings():  # run_one names the data folder by the demo's (deprecated) key
        warnings.filterwarnings("ignore", "the config key demo_data is deprecated", FutureWarning)
        record = data_efficiency.run_one(
            base, fraction, seed, steps, folder, str(data), [*extra, *ABLATIONS.get(method, ())]
        )
    record["method"] = method
    run_dir = Path(record["run_dir"])
    record["balanced_top1"] = json.loads((run_dir / "zeroshot.json").read_text())["balanced_top1"]
    record.update({k: v for k, v in retrieval_scores(run_dir, data, pairs).items() if k in RETRIEVAL})
    return record


def retrieval_scores(run_dir: Path, data: Path, pairs=None) -> dict:
    """Recall@1/5/10 both ways of the run's final model on ``data/retrieval.csv``, cached in
    ``run_dir/retrieval.json``."""
    done = run_dir / "retrieval.json"
    if done.exists():
        return json.loads(done.read_text())
    from declip_fast.atomic import atomic_write
    from declip_fast.eval.cli import load_model
    from declip_fast.eval.retrieval import retrieval_eval

    model = load_model(run_dir)
    scores = retrieval_eval(
        model, pairs or data / "retrieval.csv", "cpu", model.config.vision.image_size, num_workers=0
    )
    atomic_write(done, lambda p: p.write_text(json.dumps(scores, indent=2) + "\n"))
    return scores


def summarize(records: list[dict], order=None) -> list[dict]:
    """Per (method, fraction): each metric's mean, min, max and standard error over seeds
    (``_se``: sample standard deviation / sqrt(n); None with one seed). Rows by fraction, then
    method in ``order`` (default: first appearance)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["fraction"]), []).append(r)
    order = list(order or dict.fromkeys(r["method"] for r in records))
    rows = []
    for (method, fraction), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
        row = {"method": method, "fraction": fraction, "seeds": [r["seed"] for r in runs]}
        for metric in METRICS:
            values = [r[metric] for r in runs]
            row[f"{metric}_mean"] = statistics.fmean(values)
            row[f"{metric}_min"] = min(values)
            row[f"{metric}_max"] = max(values)
            row[f"{metric}_se"] = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
        rows.append(row)
    return rows


def _cell(row: dict, metric: str) -> str:
    mean, lo, hi, se = (row[f"{metric}_{s}"] for s in ("mean", "min", "max", "se"))
    if se is None:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ±{100 * se:.1f} ({100 * lo:.1f}..{100 * hi:.1f})"


def markdown(result: dict) -> str:
    """The two tables of a results file (zero-shot, retrieval); ``benchmarks/readme.py`` uses it."""
    meta = result["meta"]
    n_seeds = len(meta["seeds"])
    seeds = ", ".join(map(str, meta["seeds"]))
    spread = f"mean ±standard error (min..max) over seeds {seeds}" if n_seeds > 1 else f"seed {seeds}"
    lines = [
        f"Clip-art set, tiny presets, {meta['steps']} steps of batch {meta['batch_size']} at "
        f"{meta['image_size']} px, {spread}, in %; {meta['device']}, {meta['date']}, "
        f"commit {meta['commit']}. {meta['train_pairs']:,} training pairs; zero-shot on {meta['test_images']} "
        f"test images of {meta['classes']} unbalanced classes (balanced top-1: mean per-class recall; chance "
        f"{100 / meta['classes']:.1f}%); retrieval on {meta['retrieval_images']} held-out images and their "
        f"{meta['retrieval_texts']} captions. DeCLIP is the released objective (0.4 MVS + 0.2 (ISS + TSS + "
        'NNS)); "w/o" rows drop one term (w/o MVS: its weight goes to the single-pair CLIP term).',
        "",
        "| method | fraction | pairs | zero-shot top-1 | balanced top-1 | top-5 |",
        "|:---|---:|---:|---:|---:|---:|",
    ]
    summary = result["summary"]
    for r in summary:
        pairs = max(1, round(r["fraction"] * meta["train_pairs"]))
        cells = " | ".join(_cell(r, m) for m in ZEROSHOT)
        lines.append(f"| {LABELS.get(r['method'], r['method'])} | {100 * r['fraction']:g}% | {pairs:,} | {cells} |")
    lines += [
        "",
        "| method | fraction | image->text R@1 | R@5 | R@10 | text->image R@1 | R@5 | R@10 |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        cells = " | ".join(_cell(r, m) for m in RETRIEVAL)
        lines.append(f"| {LABELS.get(r['method'], r['method'])} | {100 * r['fraction']:g}% | {cells} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = result["meta"]
    panels = [
        ("balanced_top1", "zero-shot balanced top-1 (%)", 100 / meta["classes"]),
        ("t2i_R@5", "text->image R@5 (%)", 100 * min(1.0, 5 / max(1, meta["retrieval_images"]))),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (metric, label, chance) in zip(axes, panels):
        for method in meta["methods"]:
            rows = sorted((r for r in result["summary"] if r["method"] == method), key=lambda r: r["fraction"])
            if not rows:
                continue
            x = [100 * r["fraction"] for r in rows]
            mean = [100 * r[f"{metric}_mean"] for r in rows]
            lo, hi = [100 * r[f"{metric}_min"] for r in rows], [100 * r[f"{metric}_max"] for r in rows]
            if method in ABLATIONS:  # one fraction: a point with its min..max bar, set apart a little
                x = [v * 1.04 ** (1 + list(ABLATIONS).index(method)) for v in x]
                err = [[m - a for m, a in zip(mean, lo)], [b - m for m, b in zip(mean, hi)]]
                ax.errorbar(x, mean, yerr=err, fmt="s", capsize=3, markersize=4, label=LABELS.get(method, method))
            else:
                ax.plot(x, mean, marker="o", linewidth=2, label=LABELS.get(method, method))
                ax.fill_between(x, lo, hi, alpha=0.2)
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_xscale("log")
        ax.set_xticks([100 * f for f in meta["fractions"]], [f"{100 * f:g}%" for f in meta["fractions"]])
        ax.minorticks_off()
        ax.set_xlabel(f"fraction of the {meta['train_pairs']:,} clip-art training pairs")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"Tiny presets on clip art, {meta['steps']} steps, mean of {len(meta['seeds'])} seed(s) "
        f"(band/bar: lowest..highest); {meta['device']}, {meta['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def grid(seeds, fractions, ablations: bool) -> list[tuple[str, float, int]]:
    """The runs in training order: seeds outermost (a partial grid still compares the methods),
    the ablations after DeCLIP at the smallest fraction."""
    jobs = []
    for seed in seeds:
        for fraction in fractions:
            jobs += [(method, fraction, seed) for method in METHODS]
            if ablations and fraction == min(fractions):
                jobs += [(name, fraction, seed) for name in ABLATIONS]
    return jobs


def step_seconds(batch_size: int, results: Path = RESULTS) -> tuple[dict, str]:
    """Seconds per step of each method: the median over the newest data-efficiency results (the
    same tiny presets on this kind of machine), scaled to ``batch_size``; else :data:`STEP_S`."""
    files = sorted(results.glob("data_efficiency-*.json"))
    if files:
        data = json.loads(files[-1].read_text())
        scale = batch_size / data["meta"]["batch_size"]
        per = {
            m: statistics.median(r["train_s"] / r["steps"] for r in data["runs"] if r["method"] == m and "train_s" in r)
            * scale
            for m in METHODS
            if any(r["method"] == m and "train_s" in r for r in data["runs"])
        }
        if set(per) == set(METHODS):
            return per, files[-1].name
    return {m: s * batch_size / 128 for m, s in STEP_S.items()}, "a default"


def estimate(jobs, steps: int, batch_size: int, work: Path) -> str:
    per, source = step_seconds(batch_size)

    def cost(method):
        return per["clip" if method == "clip" else "declip"] * steps + EVAL_S

    def done(method, fraction, seed):
        folder = work / method if method in ABLATIONS else work
        name = f"{'declip' if method in ABLATIONS else method}-{fraction:g}-s{seed}"
        return (folder / name / "zeroshot.json").exists() and (folder / name / "retrieval.json").exists()

    total = sum(cost(m) for m, _, _ in jobs)
    left = [(m, f, s) for m, f, s in jobs if not done(m, f, s)]
    return (
        f"{len(jobs)} runs of {steps} steps: estimated wall {total / 60:.0f} min for the whole grid "
        f"(s/step: CLIP {per['clip']:.2f}, DeCLIP {per['declip']:.2f}, from {source}; +{EVAL_S:g} s scoring a run); "
        f"{len(jobs) - len(left)} done already, ~{sum(cost(m) for m, _, _ in left) / 60:.0f} min left"
    )


def ensure_data(folder: Path) -> None:
    if (folder / "classes.json").is_file():  # written last: the folder is complete, whatever its build
        return
    from declip_fast.data.clipart import ensure_clipart_data

    print(f"building the clip-art set in {folder} (declip-fast write-dataset --clipart {folder})", flush=True)
    ensure_clipart_data(folder, progress=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps of every run (default: the demo's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--no-ablations", action="store_true", help="skip DeCLIP without ISS / TSS / MVS / NNS")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "clipart", help="the clip-art folder")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "clipart_efficiency")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default=None, help="output stem (default clipart_efficiency-<date>-cpu)")
    data_efficiency.add_overrides_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import numpy as np

    from declip_fast.eval.retrieval import read_pairs
    from declip_fast.train.config import load_config

    base = load_config("demo", args.set)
    steps = args.steps or base.steps
    fractions = sorted(set(args.fractions))
    jobs = grid(args.seeds, fractions, not args.no_ablations)
    print(estimate(jobs, steps, base.data.batch_size, args.work), flush=True)
    ensure_data(args.data)
    pairs = read_pairs(args.data / "retrieval.csv")
    records = []
    for method, fraction, seed in jobs:
        start = time.perf_counter()
        record = run_one(method, fraction, seed, steps, args.work, args.data, args.set, pairs)
        print(
            f"{method:13s} fraction {fraction:<4g} seed {seed}: zero-shot top-1 {100 * record['top1']:.1f}% "
            f"balanced {100 * record['balanced_top1']:.1f}%, t2i R@5 {100 * record['t2i_R@5']:.1f}% "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        records.append(record)
    date = datetime.date.today().isoformat()
    stats = json.loads((args.data / "summary.json").read_text())
    classes = json.loads((args.data / "classes.json").read_text())
    methods = list(METHODS) + ([] if args.no_ablations else list(ABLATIONS))
    meta = {
        **data_efficiency.run_meta(date),
        "steps": steps,
        "seeds": args.seeds,
        "fractions": fractions,
        "methods": methods,
        "ablations": {} if args.no_ablations else ABLATIONS,
        "ablation_fraction": None if args.no_ablations else fractions[0],
        "overrides": args.set,
        "batch_size": base.data.batch_size,
        "image_size": base.data.image_size,
        "data": str(args.data),
        "data_build": classes.get("build"),
        "train_pairs": stats.get("written", {}).get("train", stats["splits"]["train"]),
        "test_images": len(np.load(args.data / "test_labels.npy")),
        "classes": len(classes["classes"]),
        "retrieval_images": len(pairs.images),
        "retrieval_texts": len(pairs.captions),
    }
    result = {"meta": meta, "runs": records, "summary": summarize(records, methods)}
    stem = args.out / (args.name or f"clipart_efficiency-{date}-cpu")
    return data_efficiency.write_result(result, stem, markdown, plot)


if __name__ == "__main__":
    main()

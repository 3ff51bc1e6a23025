"""``declip-fast``: the command-line entry point (train | write-dataset | eval | bench).

Thin on purpose: each subcommand parses its options and calls one library function.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_IMAGE_SIZE = 64


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_write_dataset(sub) -> None:
    p = sub.add_parser(
        "write-dataset",
        help="image-text pairs (CSV/TSV, folder, tar shards) -> FFCV .beton",
        description="Write image-text pairs to an FFCV .beton (fields: image, tokens, "
        "eda_tokens, index); with --demo, build the Fashion-MNIST demo train/test files; with --clipart, "
        "the Openclipart image-text set (train, zero-shot test, retrieval pairs).",
    )
    p.add_argument("source", nargs="?", help="CSV/TSV of (image, caption), folder of images + .txt, or .tar shard(s)")
    p.add_argument("out", nargs="?", help="output .beton")
    p.add_argument("--demo", metavar="OUT_DIR", help="build the demo data set (train/test .beton, classes.json)")
    p.add_argument(
        "--clipart",
        metavar="OUT_DIR",
        help="build the clip-art set from Debian's openclipart-svg (train/test .beton, classes.json, retrieval.csv)",
    )
    p.add_argument(
        "--max-side",
        type=_positive,
        help=f"longest stored image side (default 384; {DEMO_IMAGE_SIZE} with --demo/--clipart)",
    )
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: all cores; 1: none)")
    p.add_argument(
        "--summary-json", metavar="PATH", help="also write the summary (written, skipped, skips, pairs_per_s) as JSON"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (--demo/--clipart: rebuild)")
    p.add_argument(
        "--limit",
        type=_positive,
        help="write at most this many pairs (--clipart: render this many SVGs, for a quick set)",
    )
    p.add_argument("--train-size", type=_positive, default=10_000, help="--demo: training pairs (default 10000)")
    p.add_argument("--test-size", type=_positive, default=2_000, help="--demo: test pairs (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the EDA variants (and of the demo subsets)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_write_dataset)
    p.epilog = (
        "Exit status: 0 written (skipped pairs are counted in the summary); 1 nothing could be "
        "written; 2 a source, output or machine problem, reported in one line."
    )


def _write_dataset(args, parser) -> int:
    from declip_fast.data.write import NoPairsError, WriteConfig, save_summary, write_dataset

    if args.demo is not None or args.clipart is not None:
        if args.source or args.out or (args.demo is not None and args.clipart is not None):
            parser.error("write-dataset: give one of SOURCE OUT, --demo OUT_DIR or --clipart OUT_DIR")
        return _write_demo(args) if args.demo is not None else _write_clipart(args)
    if not (args.source and args.out):
        parser.error("write-dataset: give SOURCE OUT (or --demo OUT_DIR, --clipart OUT_DIR)")
    config = WriteConfig(
        max_side=args.max_side or 384,
        workers=args.workers,
        limit=args.limit,
        overwrite=args.overwrite,
        seed=args.seed,
        progress=not args.quiet,
    )
    # Exit status as for train: 2 a source, file or machine problem (one line), 1 nothing
    # could be written (every pair skipped; the summary says why), 0 written.
    try:
        try:
            summary = write_dataset(args.source, args.out, config)
        except NoPairsError as err:
            summary = err.summary
            print(f"error: {err}", file=sys.stderr)
        print(summary.format())
        if args.summary_json:
            save_summary(summary, args.summary_json)
    except (OSError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0 if summary.written else 1


def _write_demo(args) -> int:
    from declip_fast.data.demo import ensure_demo_data

    paths = ensure_demo_data(
        args.demo,
        train_size=args.train_size,
        test_size=args.test_size,
        image_size=args.max_side or DEMO_IMAGE_SIZE,
        seed=args.seed,
        workers=args.workers,
        progress=not args.quiet,
        rebuild=args.overwrite,
    )
    for split, summary in paths.summaries.items():
        print(f"{split}:\n{summary.format()}")
    if not paths.summaries:
        print(f"{args.demo}: already built with these parameters (--overwrite rebuilds it)")
    print(f"train: {paths.train}\ntest: {paths.test}\nclasses: {paths.classes}")
    if args.summary_json:
        _save_json({split: s.to_json() for split, s in paths.summaries.items()}, args.summary_json)
    return 0


def _write_clipart(args) -> int:
    from declip_fast.data.clipart import ensure_clipart_data

    try:
        paths = ensure_clipart_data(
            args.clipart,
            limit=args.limit,
            workers=args.workers,
            image_size=args.max_side or DEMO_IMAGE_SIZE,
            seed=args.seed,
            progress=not args.quiet,
            rebuild=args.overwrite,
        )
    except (OSError, ValueError) as err:  # packages missing, an unwritable folder: one line
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    for split, summary in paths.summaries.items():
        print(f"{split}:\n{summary.format()}")
    if paths.stats:
        stats = paths.stats
        print(
            f"kept {stats['kept']} pairs (train {stats['splits']['train']}, zero-shot test {stats['splits']['test']}, "
            f"retrieval {stats['splits']['retrieval']}); skipped {stats['skipped']} files"
        )
        print("skipped: " + ", ".join(f"{reason} {n}" for reason, n in stats["skipped_by_reason"].items()))
        print("classes: " + ", ".join(f"{c} {n}" for c, n in stats["classes"].items()))
    else:
        print(f"{args.clipart}: already built with these parameters (--overwrite rebuilds it)")
    print(f"train: {paths.train}\ntest: {paths.test}\nclasses: {paths.classes}\nretrieval: {paths.retrieval}")
    if args.summary_json:
        summaries = {split: s.to_json() for split, s in paths.summaries.items()}
        _save_json({**summaries, "clipart": paths.stats} if paths.stats else summaries, args.summary_json)
    return 0


def _save_json(data, path: str) -> None:
    import json
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain a model from a YAML preset (configs/) with overrides",
        description="Train from a config preset (a name in configs/ or a YAML path) with "
        "dotted key=value overrides, e.g. `declip-fast train demo steps=50 optim.lr=3e-4`. "
        "Under torchrun every rank runs this command.",
    )
    p.add_argument("config", nargs="?", default="demo", help="preset name or YAML file (default: demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the config")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--allow-config-change",
        action="append",
        default=[],
        metavar="KEY",
        help="resume even though KEY differs from the checkpoint's config (repeatable; 'all' "
        "for any). Checked keys: model, loss terms and queue, data.batch_size / image_size / "
        "beton / source / fraction, world_size; without this flag such a resume is "
        "refused, naming the keys. Also the config key allow_config_change=[...]",
    )
    p.add_argument(
        "--debug", action="store_true", help="show the traceback of an error instead of its one-line message"
    )
    p.set_defaults(func=_train)
    p.epilog = (
        "Exit status: 0 done or preempted (SIGTERM); 1 the run failed (diverged, or most steps "
        "skipped); 2 a config, file or machine problem, reported in one line (--debug: traceback)."
    )


def _fail(err: BaseException, debug: bool, status: int) -> int:
    """One line on stderr (the traceback too with --debug); ``status`` is the exit status."""
    from declip_fast.train.errors import one_line

    if debug:
        import traceback

        traceback.print_exception(err)
    print(f"error: {one_line(err)}", file=sys.stderr)
    return status


def _train(args, parser) -> int:
    import logging

    import yaml

    from declip_fast.train.config import load_config, to_dict
    from declip_fast.train.errors import RunFailed, UserError
    from declip_fast.train.validate import check_values

    try:
        config = load_config(args.config, args.overrides)
        if args.allow_config_change:
            config.allow_config_change += tuple(args.allow_config_change)
            check_values(config)
    except (ValueError, FileNotFoundError, TypeError) as err:
        return _fail(err, args.debug, 2)
    if args.print_config:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        # The model the config builds (preset defaults, then model.overrides), for reading only.
        resolved = yaml.safe_dump(to_dict(config.model.architecture()), sort_keys=False)
        print(f"# model.preset {config.model.preset} with model.overrides, resolved:")
        print("".join(f"#   {line}\n" for line in resolved.splitlines()), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from declip_fast.train.trainer import Trainer

    try:  # errors before the first step are the config's, the files' or the machine's
        trainer = Trainer(config).build()
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError, ImportError) as err:
        return _fail(err, args.debug, 2)
    try:
        summary = trainer.train()
    except UserError as err:
        return _fail(err, args.debug, 2)
    except RunFailed as err:
        return _fail(err, args.debug, 1)
    finally:
        trainer.close()
    results = summary.get("zeroshot")
    line = f"{summary['status']}: {summary['steps']} steps ({summary['skipped_steps']} skipped) in {config.run_dir}"
    if summary.get("skipped_samples"):
        line += f"; {summary['skipped_samples']} undecodable samples skipped"
    if results:
        line += "; zero-shot " + ", ".join(f"{k} {v:.1%}" for k, v in results.items() if isinstance(v, float))
    print(line)
    return 0


def _checkout() -> Path | None:
    """The source checkout holding ``benchmarks/run.py``: the one this package was installed from
    (an editable install), else the current folder; None when neither has it."""
    import declip_fast

    for root in (Path(declip_fast.__file__).resolve().parent.parent, Path.cwd()):
        if (root / "benchmarks" / "run.py").is_file():
            return root
    return None


def bench(argv: list[str]) -> int:
    """``declip-fast bench [ARGS...]``: what ``make bench`` runs, from the source checkout (the
    benchmarks are not part of the wheel): ``python -m benchmarks.run ARGS`` (ARGS go to it:
    ``--json PATH``, bench files, ``-k ...``), then, if that passed, the kernel budget. Its exit
    status is theirs; 2 when no checkout is found."""
    import subprocess

    root = _checkout()
    if root is None:
        print(
            "error: declip-fast bench runs the benchmarks of a source checkout: no benchmarks/run.py "
            "here or next to the installed package; run it from the repository root",
            file=sys.stderr,
        )
        return 2
    code = subprocess.run([sys.executable, "-m", "benchmarks.run", *argv], cwd=root).returncode
    if code == 0 and not {"-h", "--help"} & set(argv):
        code = subprocess.run([sys.executable, "-m", "benchmarks.kernel_budget"], cwd=root).returncode
    return code


def _add_eval(sub) -> None:
    from declip_fast.eval.cli import add_parser  # argparse only: the heavy imports wait for run()

    add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="declip-fast", description="Fast DeCLIP / CLIP pretraining.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_write_dataset(sub)
    _add_train(sub)
    _add_eval(sub)
    # Only listed here: main() hands everything after `bench` to the benchmark runner untouched.
    sub.add_parser(
        "bench", help="run the benchmarks of the source checkout, as `make bench` (arguments go to benchmarks/run.py)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args, parser)


if __name__ == "__main__":
    sys.exit(main())

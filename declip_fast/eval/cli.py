"""``declip-fast eval``: zero-shot, linear-probe and image-text retrieval evaluation of a checkpoint.

    declip-fast eval RUN_DIR --demo DEMO_DIR [--linear-probe] [--retrieval PAIRS]
    declip-fast eval weights.pt --preset declip_tiny --data test.beton [--labels test_labels.npy]
                     [--classes classes.json] [--linear-probe --train-data train.beton]
    declip-fast eval weights.pt --preset declip_vit_b32 --data imagenet/val --classes imagenet.json

``--data`` is a ``.beton`` (labels from ``--labels``, default ``<stem>_labels.npy`` beside it) or an
ImageFolder-layout folder. Class names and prompts come from ``--classes`` (default: a
``classes.json`` beside a ``.beton``; a folder's sorted subfolder names otherwise); without
prompts or templates there, CLIP's 80 ImageNet templates are used. Zero-shot reports top-1,
balanced top-1 (mean per-class recall) and top-5.

``--retrieval PAIRS`` (with or without ``--data`` / ``--demo``) adds image -> text and text ->
image recall@1/5/10 on held-out pairs: a CSV/TSV of image,caption rows (rows of one image file are
its captions) or a folder of images with same-named ``.txt`` captions, one caption per line
(:mod:`declip_fast.eval.retrieval`).

The model comes from :func:`load_model`. Registered by ``declip_fast.cli`` through
:func:`add_parser`; ``run`` is the subcommand's function.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to ``subparsers`` (``set_defaults(func=run)``)."""
    p = subparsers.add_parser(
        "eval",
        help="zero-shot / linear-probe / retrieval evaluation",
        description="Zero-shot top-1/top-5 (and linear-probe top-1, image-text retrieval recall@K) of a checkpoint.",
    )
    p.add_argument(
        "checkpoint",
        metavar="CHECKPOINT_OR_RUN_DIR",
        help="a run folder (config.yaml + checkpoints/; its newest checkpoint), one of its "
        "checkpoint folders, or a state_dict .pt (with --preset)",
    )
    p.add_argument("--data", help="test images: .beton or ImageFolder-layout folder")
    p.add_argument("--labels", help="labels .npy of a .beton (default: <stem>_labels.npy beside it)")
    p.add_argument(
        "--classes",
        help="classes JSON: {classes, prompts | templates} (default: classes.json "
        "beside a .beton; a folder's subfolder names)",
    )
    p.add_argument("--demo", metavar="DIR", help="evaluate on the demo data in DIR (test.beton, classes.json)")
    p.add_argument(
        "--preset",
        help="model preset of a state_dict file (declip_fast.models.presets); "
        "for a run folder it replaces the model of its config.yaml",
    )
    p.add_argument("--image-size", type=int, help="evaluation crop size (default: the model's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, help="loader workers (default: up to 8)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--linear-probe", action="store_true", help="also fit a logistic-regression probe")
    p.add_argument("--train-data", help="probe train images (.beton or folder; --demo: train.beton)")
    p.add_argument("--train-labels", help="labels .npy of --train-data")
    p.add_argument(
        "--retrieval",
        metavar="PAIRS",
        help="image-text recall@1/5/10 on held-out pairs: a CSV/TSV of image,caption rows or a folder "
        "of images with same-named .txt captions (one per line)",
    )
    p.set_defaults(func=run)
    return p


def load_model(path, preset: str | None = None):
    """The model to evaluate, on the CPU, from

    (a) a run folder (``config.yaml`` + ``checkpoints/``: its newest complete checkpoint) or one
        checkpoint folder inside it: the model is built from the run's ``config.yaml`` (or
        ``preset``) and filled by ``declip_fast.distributed.checkpoint_format.load_model_for_eval``
        (re-exported as ``declip_fast.train.checkpoint.load_model_for_eval``);
    (b) a ``torch.save``d state dict (optionally under a "model" / "state_dict" key) of ``preset``.
    """
    from declip_fast.models.presets import build

    path = Path(path)
    if path.is_dir():
        return _load_from_run(path, preset, build)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    if preset is None:
        raise ValueError(f"{path} is a state_dict file: name its model with --preset")
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    model = build(preset)
    model.load_state_dict(state)
    return model


def _load_from_run(path: Path, preset: str | None, build):
    # a run folder holds config.yaml; a checkpoint folder is RUN/checkpoints/<step>
    config_file = next((d / "config.yaml" for d in (path, path.parent.parent) if (d / "config.yaml").is_file()), None)
    if config_file is None and preset is None:
        raise ValueError(
            f"{path} is not a run folder (no config.yaml in it or in its run folder); name the model with --preset"
        )
    from declip_fast.distributed.checkpoint_format import load_model_for_eval

    if preset is not None:
        model = build(preset)
    else:
        config = _run_model_config(config_file)
        model = build(config.preset, **config.overrides)
    load_model_for_eval(path, model)
    return model


def _run_model_config(config_file: Path):
    """The ``model`` section of a run's ``config.yaml`` as a ModelConfig (read here, not through
    ``declip_fast.train.config``: eval does not import train)."""
    import yaml

    from declip_fast.models.model_config import ModelConfig

    try:
        values = yaml.safe_load(config_file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{config_file}: not valid YAML ({err})") from err
    section = values.get("model") if isinstance(values, dict) else None
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ValueError(f"{config_file}: model must be a mapping, got {section!r}")
    try:
        return ModelConfig(**section)
    except TypeError as err:
        raise ValueError(f"{config_file}: model: {err}") from None


def _sources(args) -> dict:
    """data / labels / classes / train data paths, filled in from --demo."""
    if args.demo:
        demo = Path(args.demo)
        if not (demo / "classes.json").is_file():
            raise FileNotFoundError(
                f"{demo}/classes.json not found: build the demo data first (declip-fast write-dataset --demo {demo})"
            )
        return {
            "data": demo / "test.beton",
            "labels": demo / "test_labels.npy",
            "classes": demo / "classes.json",
            "train_data": demo / "train.beton",
            "train_labels": demo / "train_labels.npy",
        }
    return {
        "data": args.data,
        "labels": args.labels,
        "classes": args.classes,
        "train_data": args.train_data,
        "train_labels": args.train_labels,
    }


def run(args, parser: argparse.ArgumentParser | None = None) -> int:
    """Evaluate, print a small table, return the exit code."""
    if (args.data and args.demo) or not (args.data or args.demo or args.retrieval):
        message = "eval: give either --data PATH or --demo DIR (and/or --retrieval PAIRS)"
        if parser is not None:
            parser.error(message)
        print(f"error: {message}", file=sys.stderr)
        return 2
    import torch

    from declip_fast.eval.zeroshot import labelled_images, zeroshot_eval

    try:
        src = _sources(args)
        if args.linear_probe and not src["train_data"]:
            raise ValueError("--linear-probe needs --train-data (or --demo)")
        if args.linear_probe and not src["data"]:
            raise ValueError("--linear-probe needs --data (or --demo)")
        if args.retrieval:  # listed (not decoded) before the model loads: a bad table fails at once
            from declip_fast.eval.retrieval import read_pairs, retrieval_eval

            pairs = read_pairs(args.retrieval)
        model = load_model(args.checkpoint, args.preset)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model.to(device)
        size = args.image_size or model.config.vision.image_size
        kwargs = {"batch_size": args.batch_size, "num_workers": args.workers}
        rows = {}
        if src["data"]:
            result = zeroshot_eval(model, src["data"], src["classes"], device, size, labels=src["labels"], **kwargs)
            rows.update({f"zero-shot {k}": v for k, v in result.items()})
        if args.linear_probe:
            from declip_fast.eval.linear_probe import linear_probe

            train = labelled_images(src["train_data"], size, labels=src["train_labels"], **kwargs)
            test = labelled_images(src["data"], size, labels=src["labels"], **kwargs)
            probe = linear_probe(model, train, test, device)
            rows.update(
                {
                    "linear-probe top1": probe["top1"],
                    "linear-probe best_C": probe["best_C"],
                    "linear-probe n_train": probe["n_train"],
                }
            )
        if args.retrieval:
            result = retrieval_eval(model, pairs, device, size, **kwargs)
            rows.update({f"retrieval {k}": v for k, v in result.items()})
    except (OSError, ValueError, RuntimeError, ImportError) as err:
        # A missing or mismatched file or checkpoint: one line, exit 2 (as train does).
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0


def format_table(rows: dict) -> str:
    width = max(len(k) for k in rows)
    lines = [f"{'metric':<{width}}  value"]
    for key, value in rows.items():
        text = f"{value:.4f}" if "top" in key or "R@" in key else f"{value:g}"
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)

"""The clip-art data set: public-domain Openclipart SVGs and their metadata as image-text pairs.

Source: Debian's ``openclipart-svg`` (``/usr/share/openclipart/svg/<category>/...``, ~8,100 SVGs;
``DECLIP_FAST_OPENCLIPART`` overrides the folder), rendered by ``rsvg-convert`` (``librsvg2-bin``).
Nothing is installed here: without either, one line names the packages (``FileNotFoundError``).
``declip-fast write-dataset --clipart OUT_DIR`` runs :func:`ensure_clipart_data`:

1. list: every ``*.svg`` under the root, sorted by relative path; unreadable or unparseable files
   are skipped (counted); copies of one drawing (the package keeps the same drawing in several
   folders and as symlinks) are dropped by :func:`~declip_fast.data.clipart_meta.drawing_digest`,
   the first path in sorted order kept (real files before symlinks); files with a license other
   than public domain / CC0 go;
2. caption (:mod:`declip_fast.data.clipart_meta`): title (or file-name fallback for boilerplate
   titles), short description, cleaned keywords; boilerplate-only files are skipped;
3. render (:mod:`declip_fast.data.clipart_render`): 128 px, margins cropped, ``image_size`` (64)
   px squares on white; blank renders and pixel-identical images (after the first) are skipped;
4. split by caption group (the title without case, digits and punctuation: near-duplicates share
   one and never straddle splits): per class (``CLASS_FOLDERS``, the category folders with at
   least ``min_class_size`` (40) images) about ``zeroshot_fraction`` of its groups are held out
   for the zero-shot test, then about ``retrieval_fraction`` of all pairs (other groups) for
   retrieval; the rest is train. Groups are drawn in the order of SHA-256 of (seed, group): no
   hash seed, clock or worker count changes anything.

``OUT_DIR`` then holds: ``train.beton`` (the writer's layout, EDA variants included) and ``pairs.csv``
(every kept pair: source path, split, class, group, caption); ``test.beton`` + ``test_labels.npy``
+ ``classes.json`` (class names, zero-shot prompts, the build parameters) as the demo writes them,
so ``declip-fast eval --demo OUT_DIR`` reads them; ``retrieval.csv`` (image,caption rows) with its
PNGs in ``retrieval/`` for ``declip-fast eval --retrieval``; ``summary.json`` (counts: kept,
skipped by reason, class sizes, vocabulary). ``classes.json`` is written last: its presence with
the same build parameters means the folder is complete, and a second call does nothing.
``limit`` renders only that many of the captioned files (spread evenly over the sorted list; the
caption statistics still come from the whole collection) and scales ``min_class_size`` down.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from declip_fast.atomic import atomic_write

from . import clipart_meta as meta
from . import clipart_output as output
from . import clipart_render as render
from .clipart_split import assign_classes, split_groups
from .demo import _folder_lock, _save_npy, with_articles
from .sources import Pair
from .write import WriteConfig, write_pairs

OPENCLIPART_DIR = "/usr/share/openclipart/svg"
ZEROSHOT_TEMPLATES = (
    "a clip art drawing of a {}.",
    "a drawing of a {}.",
    "an icon of a {}.",
    "a cartoon of a {}.",
    "a vector illustration of a {}.",
    "a simple picture of a {}.",
)
_FORMAT = 1  # bump when the written files change meaning


@dataclasses.dataclass(frozen=True)
class ClipartData:
    train: Path
    test: Path
    test_labels: Path
    classes: Path
    retrieval: Path  # the CSV; its images are in retrieval/ beside it
    pairs: Path
    summary: Path
    summaries: dict = dataclasses.field(default_factory=dict, compare=False)  # split -> WriteSummary, if built
    stats: dict = dataclasses.field(default_factory=dict, compare=False)  # summary.json's content, if built


def svg_root(folder: str | os.PathLike | None = None) -> Path:
    """The SVG folder; ``FileNotFoundError`` (one line naming the packages) when it is missing."""
    root = Path(folder or os.environ.get("DECLIP_FAST_OPENCLIPART", OPENCLIPART_DIR))
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} not found: install Debian's {render.PACKAGES} (apt-get install {render.PACKAGES}; "
            "scripts/setup.sh does) or point DECLIP_FAST_OPENCLIPART at the SVG folder"
        )
    return root


def list_svgs(root: Path) -> list[str]:
    """Relative '/'-separated paths of every ``*.svg`` under ``root`` (symlinks included), sorted."""
    found = []
    for folder, _, files in os.walk(root):
        found += [Path(folder, f).relative_to(root).as_posix() for f in files if f.lower().endswith(".svg")]
    return sorted(found)


def _read(job: tuple[str, str]) -> meta.Svg | str:
    """(root, relative path) -> its metadata, or a skip reason (never raises)."""
    root, path = job
    try:
        with open(os.path.join(root, path), "rb") as f:
            data = f.read()
    except OSError:
        return "unreadable file"
    try:
        return meta.parse_svg(path, data)
    except Exception:  # ParseError, or an encoding expat does not know
        return "unparseable SVG"


def _pool_map(fn, jobs: list, workers: int, progress: bool, what: str) -> list:
    """``[fn(job) for job in jobs]`` in order, on ``workers`` processes (0: all cores; 1: here)."""
    from tqdm import tqdm

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(workers if workers > 0 else cores, max(1, len(jobs)))
    bar = functools.partial(tqdm, total=len(jobs), disable=not progress, desc=what, unit="file", smoothing=0.1)
    if workers <= 1:
        return list(bar(map(fn, jobs)))
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(os.getpid(),)) as pool:
        return list(bar(pool.map(fn, jobs, chunksize=max(1, min(32, len(jobs) // (4 * workers))))))


def _worker_init(parent: int) -> None:
    import signal

    from .write_prepare import _die_with_parent

    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def collect(root: Path, workers: int = 0, progress: bool = False) -> tuple[list[meta.Caption], list[tuple[str, str]]]:
    """Steps 1-2: (captions of the kept files, (path, reason) of the skipped), in path order."""
    words = meta.english_words()
    paths = list_svgs(root)
    items = _pool_map(_read, [(str(root), p) for p in paths], workers, progress, "metadata")
    skips, svgs, seen = [], [], set()
    # real files first, then links: the copy kept is a real file where there is one
    for path, item in sorted(zip(paths, items), key=lambda x: (os.path.islink(root / x[0]), x[0])):
        if isinstance(item, str):
            skips.append((path, item))
        elif item.digest in seen:
            skips.append((path, "duplicate drawing"))
        elif not meta.is_public_domain(item):
            skips.append((path, "license not public domain"))
        else:
            seen.add(item.digest)
            svgs.append(item)
    svgs.sort(key=lambda s: s.path)
    captions, caption_skips = meta.make_captions(svgs, words)
    return captions, skips + caption_skips


def spread(items: list, limit: int | None) -> list:
    """``limit`` items spread evenly over ``items`` (all of them without a limit)."""
    if limit is None or limit >= len(items):
        return list(items)
    return [items[i * len(items) // limit] for i in range(max(0, limit))]


def vocabulary(texts) -> set[str]:
    return {w for text in texts for w in re.findall(r"[^\W\d_]+", text.lower())}


def ensure_clipart_data(
    out_dir: str | os.PathLike,
    limit: int | None = None,
    workers: int = 0,
    image_size: int = 64,
    seed: int = 0,
    min_class_size: int = 40,
    zeroshot_fraction: float = 0.2,
    retrieval_fraction: float = 0.1,
    progress: bool = False,
    rebuild: bool = False,
    source_dir: str | os.PathLike | None = None,
) -> ClipartData:
    """The clip-art files in ``out_dir`` (see the module docstring), built first when missing,
    incomplete or built with other parameters."""
    out = Path(out_dir)
    names = ("train.beton", "test.beton", "test_labels.npy", "classes.json", "retrieval.csv", "pairs.csv")
    paths = ClipartData(*(out / n for n in names), out / "summary.json")
    build = {
        "format": _FORMAT,
        "limit": limit,
        "image_size": image_size,
        "render_size": render.RENDER_SIZE,
        "seed": seed,
        "min_class_size": min_class_size,
        "zeroshot_fraction": zeroshot_fraction,
        "retrieval_fraction": retrieval_fraction,
    }
    if not rebuild and _is_complete(paths, build):
        return paths
    root, rsvg = svg_root(source_dir), render.rsvg_convert()  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    with _folder_lock(out):
        if not rebuild and _is_complete(paths, build):  # built by another process meanwhile
            return paths
        paths.classes.unlink(missing_ok=True)  # the folder is incomplete until it is rewritten
        captions, skips = collect(root, workers, progress)
        if not captions:
            raise ValueError(f"{root}: no SVG with a usable caption ({len(skips)} skipped)")
        chosen = spread(captions, limit)
        jobs = [(str(root / c.svg.path), rsvg, render.RENDER_SIZE, image_size) for c in chosen]
        kept, images, seen = [], [], set()
        for caption, image in zip(chosen, _pool_map(render.render_item, jobs, workers, progress, "render")):
            digest = hashlib.sha256(image.tobytes()).digest() if not isinstance(image, str) else None
            if isinstance(image, str) or digest in seen:
                skips.append((caption.svg.path, image if isinstance(image, str) else "duplicate image"))
                continue
            seen.add(digest)
            kept.append(caption)
            images.append(image)
        scaled = min_class_size if limit is None else max(2, math.ceil(min_class_size * len(chosen) / len(captions)))
        classes, labels = assign_classes([c.svg.path for c in kept], scaled)
        if not classes:
            raise ValueError(f"no category has {scaled}+ rendered images (limit {limit}): nothing to test zero-shot on")
        split = split_groups([c.group for c in kept], labels, seed, zeroshot_fraction, retrieval_fraction)
        config = WriteConfig(
            max_side=image_size, upscale=True, seed=seed, workers=workers, overwrite=True, progress=progress
        )
        rows = {name: [i for i, s in enumerate(split) if s == name] for name in ("train", "test", "retrieval")}
        for name in ("train", "test"):
            pairs = [Pair(kept[i].svg.path, images[i], kept[i].caption) for i in rows[name]]
            summary = paths.summaries[name] = write_pairs(pairs, getattr(paths, name), config)
            if name == "test" and summary.written != len(pairs):  # labels are row-aligned
                raise RuntimeError(f"clipart test: wrote {summary.written} of {len(pairs)} ({summary.by_reason()})")
        test_labels = np.array([labels[i] for i in rows["test"]], np.int64)
        atomic_write(paths.test_labels, functools.partial(_save_npy, array=test_labels))
        output.write_retrieval(paths.retrieval, [(images[i], kept[i].caption) for i in rows["retrieval"]])
        output.write_table(paths.pairs, kept, labels, classes, split)
        stats = _stats(paths, captions, chosen, kept, skips, classes, labels, split)
        atomic_write(paths.summary, lambda p: p.write_text(json.dumps(stats, indent=2) + "\n"))
        paths.stats.update(stats)
        manifest = {
            "classes": classes,
            "templates": list(ZEROSHOT_TEMPLATES),
            "prompts": {c: [with_articles(t.format(c)) for t in ZEROSHOT_TEMPLATES] for c in classes},
            "build": build,
        }
        atomic_write(paths.classes, lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))
    return paths


def _stats(paths, captions, chosen, kept, skips, classes, labels, split) -> dict:
    counts = collections.Counter(s for s in split if s)
    return {
        "captioned": len(captions),
        "rendered": len(chosen),
        "kept": len(kept),
        "from_file_name": sum(c.source == "file name" for c in kept),
        "splits": {name: counts[name] for name in ("train", "test", "retrieval")},
        "held_out_unlabelled": split.count(None),
        "written": {name: s.written for name, s in paths.summaries.items()},
        "skipped": len(skips),
        "skipped_by_reason": dict(collections.Counter(r for _, r in skips).most_common()),
        "classes": {c: sum(label == i for label in labels) for i, c in enumerate(classes)},
        "test_per_class": {
            c: sum(labels[j] == i for j, s in enumerate(split) if s == "test") for i, c in enumerate(classes)
        },
        "vocabulary": len(vocabulary(c.caption for c in kept)),
        "skips": [{"source": p, "reason": r} for p, r in skips],
    }


def _is_complete(paths: ClipartData, build: dict) -> bool:
    files = [paths.train, paths.test, paths.test_labels, paths.classes, paths.retrieval, paths.pairs, paths.summary]
    if not all(p.is_file() for p in files):
        return False
    try:
        return json.loads(paths.classes.read_text()).get("build") == build
    except (OSError, ValueError):
        return False

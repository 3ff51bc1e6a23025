"""Where image-text pairs come from: listing a source without reading its images.

Sources: a CSV/TSV of (image path relative to the table's folder or absolute, caption), with or
without an ``image``/``caption`` header; a folder of images with same-named ``.txt`` captions;
webdataset tar shards as img2dataset writes them (``key.jpg`` + ``key.txt``), one ``.tar`` or a
folder of them. Listing only records where the bytes are (:class:`Blob`); decoding, and the
skips it finds, happen in the writer's workers. Problems found while listing (a malformed row, an
image without a caption, an unreadable tar) are returned as :class:`Skip` records.
"""

from __future__ import annotations

import csv
import os
import tarfile
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"})
IMAGE_COLUMNS = ("image", "image_path", "filepath", "file", "path", "img")
CAPTION_COLUMNS = ("caption", "text", "title")


class Blob(NamedTuple):
    """Bytes in a file: the whole file (size None) or ``size`` bytes at ``offset`` (a tar member)."""

    path: str
    offset: int = 0
    size: int | None = None


class Pair(NamedTuple):
    source: str  # how a skip names it
    image: Blob | np.ndarray | None  # None: missing
    caption: str | bytes | Blob | None  # None: missing


class Skip(NamedTuple):
    source: str
    reason: str


def list_pairs(source: str | os.PathLike) -> tuple[list[Pair], list[Skip]]:
    """The candidate pairs of a source, in source order, and what was skipped while listing it."""
    src = Path(source)
    if src.is_dir():
        shards = sorted(p for p in src.iterdir() if p.suffix == ".tar" and p.is_file())
        return _tar_pairs(shards) if shards else _folder_pairs(src)
    if not src.is_file():
        raise FileNotFoundError(f"no such source: {src}")
    if src.suffix == ".tar":
        return _tar_pairs([src])
    if src.suffix.lower() in (".csv", ".tsv"):
        return _table_pairs(src)
    raise ValueError(f"unknown source kind {src} (want a .csv/.tsv table, a .tar shard or a folder)")


def _table_pairs(path: Path) -> tuple[list[Pair], list[Skip]]:
    import csv

    # surrogateescape: a row with bad bytes is skipped as "caption not utf-8", not the whole file
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        rows = list(csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    image_col, caption_col, first_line = 0, 1, 1
    if rows:
        names = [c.strip().lower() for c in rows[0]]
        img = [i for i, n in enumerate(names) if n in IMAGE_COLUMNS]
        cap = [i for i, n in enumerate(names) if n in CAPTION_COLUMNS]
        if img and cap:
            image_col, caption_col, rows, first_line = img[0], cap[0], rows[1:], 2
    pairs, skips, width = [], [], max(image_col, caption_col) + 1
    for line, row in enumerate(rows, start=first_line):  # the file's line number (one-line rows)
        source = f"{path}:{line}"
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if len(row) < width or not row[image_col].strip():
            skips.append(Skip(source, "malformed row"))
            continue
        image = Path(row[image_col].strip())
        image = image if image.is_absolute() else path.parent / image
        pairs.append(Pair(f"{source} {image}", Blob(str(image)), row[caption_col]))
    return pairs, skips


def _group_pairs(items: dict[str, dict[str, Blob]], prefix: str) -> tuple[list[Pair], list[Skip]]:
    """Pairs from key -> {extension -> blob}: one image extension plus ``.txt`` per key."""
    pairs, skips = [], []
    for key, parts in items.items():
        images = [parts[e] for e in sorted(parts) if e in IMAGE_EXTENSIONS]
        if not images and ".txt" not in parts:
            continue  # e.g. a lone .json
        source = f"{prefix}{key}"
        if not images:
            skips.append(Skip(source, "missing image"))
        elif len(images) > 1:
            skips.append(Skip(source, "several images for one caption"))
        else:
            pairs.append(Pair(source, images[0], parts.get(".txt")))
    return pairs, skips


def _folder_pairs(folder: Path) -> tuple[list[Pair], list[Skip]]:
    items: dict[str, dict[str, Blob]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stem = str(path.relative_to(folder).with_suffix(""))
        items.setdefault(stem, {})[path.suffix.lower()] = Blob(str(path))
    return _group_pairs(items, f"{folder}{os.sep}")


def _tar_pairs(shards: Sequence[Path]) -> tuple[list[Pair], list[Skip]]:
    pairs, skips = [], []
    for shard in shards:
        items: dict[str, dict[str, Blob]] = {}
        try:
            with tarfile.open(shard, "r:") as tar:  # uncompressed only: members are byte ranges
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, name = member.name.rpartition("/")
                    key, dot, ext = name.partition(".")  # webdataset: the key ends at the first dot
                    key = f"{folder}/{key}" if folder else key
                    items.setdefault(key, {})["." + ext.lower() if dot else ""] = Blob(
                        str(shard), member.offset_data, member.size)
        except (tarfile.TarError, OSError, EOFError) as err:  # a cut shard: keep what was listed
            skips.append(Skip(str(shard), f"unreadable tar ({type(err).__name__})"))
        shard_pairs, shard_skips = _group_pairs(items, f"{shard}:")
        pairs += shard_pairs
        skips += shard_skips
    return pairs, skips


# -- preparing one pair (runs in the workers) ---------------------------------------------------

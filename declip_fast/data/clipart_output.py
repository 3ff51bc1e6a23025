"""The clip-art data set's tables: ``retrieval.csv`` with its PNGs, and ``pairs.csv`` (every pair kept).

Used by :mod:`declip_fast.data.clipart`. The tables are written whole, then renamed into place; text is UTF-8.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np

from declip_fast.atomic import atomic_write

from .clipart_render import png_bytes


def write_retrieval(table: Path, pairs: list[tuple[np.ndarray, str]]) -> None:
    """``retrieval.csv`` (image,caption; images relative to its folder) and the PNGs in ``retrieval/``."""
    folder = table.parent / "retrieval"
    shutil.rmtree(folder, ignore_errors=True)  # this build's images only
    folder.mkdir()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "caption"])
    for i, (image, caption) in enumerate(pairs):
        (folder / f"{i:05d}.png").write_bytes(png_bytes(image))
        writer.writerow([f"retrieval/{i:05d}.png", caption])
    atomic_write(table, lambda p: p.write_text(buffer.getvalue(), encoding="utf-8"))


def write_table(path: Path, kept, labels, classes, split) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["source", "split", "class", "group", "caption"])
    for caption, label, part in zip(kept, labels, split):
        writer.writerow(
            [caption.svg.path, part or "", classes[label] if label >= 0 else "", caption.group, caption.caption]
        )
    atomic_write(path, lambda p: p.write_text(buffer.getvalue(), encoding="utf-8"))

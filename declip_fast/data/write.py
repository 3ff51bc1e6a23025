"""Image-text pairs -> one FFCV ``.beton`` file (``declip-fast write-dataset SOURCE OUT.beton``).

Field layout (``FIELDS``; the loaders rely on it, in this order):

- ``image``: ``RGBImageField(write_mode="jpg", max_resolution=max_side, jpeg_quality=90)``: the
  image as RGB, longest side shrunk to ``max_side`` (default 384) with FFCV's size rule (filters:
  ``_fit``), stored as a JPEG made by FFCV's own ``encode_jpeg``;
- ``tokens``: ``NDArrayField(int32, (77,))``: the caption, CLIP-tokenized (``tokenizer.tokenize``);
- ``eda_tokens``: ``NDArrayField(int32, (EDA_VARIANTS, 77))``: EDA_VARIANTS = 4 EDA variants of the
  caption, tokenized: ``eda_variants(caption, i, seed)``, one ``random.Random(eda_seed(i, seed))``
  per pair, ``i`` its position among the listed candidates (skipped ones count), so a file is
  reproducible whatever the worker count. The loader picks one row per
  sample per epoch: training never tokenizes or runs EDA;
- ``index``: ``IntField``: the sample's row number in the written file (coverage tests).

Sources (``list_pairs``): a CSV/TSV of (image path, caption) rows, paths absolute or relative to
the table's folder, header optional (``image``/``caption`` or the aliases below); a folder of images
with same-named ``.txt`` captions (searched recursively); webdataset tar shards as img2dataset
writes them (``key.jpg`` + ``key.txt``): one ``.tar`` or a folder of them. Enumeration only records
where the bytes are (a file, a byte range inside an uncompressed tar, or an in-memory array).
A table's malformed rows (an unterminated or stray quote, a wrong number of fields) are skipped
and named by the line their record starts on (1-based, the header is line 1); a caption longer
than ``MAX_CAPTION_CHARS`` (16,384 characters) is skipped as ``caption too long``, from any
source. Every skip is counted by reason in the summary.

How it runs:

- Workers (``write_prepare``: a process pool, forked after the tokenizer and the WordNet table
  are built, so they share them, and before the output file is opened) prepare chunks of pairs:
  caption checks, image decoding by content (the extension is never trusted; large JPEGs are
  decoded at a reduced DCT scale, still >= the target size), RGB conversion (alpha composited on
  white), shrinking (``_fit``), JPEG encoding, EDA, and one tokenizer call per chunk. Bad input
  becomes a skip with a reason; a worker never raises for it. A worker dies with the writer,
  even one killed outright (``PR_SET_PDEATHSIG`` on Linux).
- The main process takes the chunks back in source order (a bounded window of futures, so memory
  stays flat) and appends them with FFCV's own page allocator (``write_container``: header, field
  table, metadata and allocation table laid out as ``ffcv.writer.DatasetWriter`` lays them out).
  The file is byte-identical whatever the worker count.
- Why not ``DatasetWriter.from_indexed_dataset``: it must know the sample count before it starts
  (we know it only after decoding, since bad pairs are dropped) and its workers encode the images;
  skipping bad pairs with it would mean decoding everything twice. Its metadata also lives in
  /dev/shm, and a worker that raises leaves its progress loop waiting forever. Here the metadata
  region is reserved for every candidate; the header counts only the written ones (the rest is a
  few bytes of slack per skipped pair), and a crashed worker raises ``BrokenProcessPool``.
- The output (``write_output``) is checked before any work, written under a hidden temporary
  name in the destination folder and renamed when complete, so an interrupted or failed write
  never leaves a file that looks finished; one left by a killed writer is removed by the next write
  of the same output, with a warning naming it. An OS error on the output (a read-only or
  uncreatable folder, a name too long, a full disk) is a :class:`PathError` of one line naming the
  path.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from declip_fast.data import write_output as output
from declip_fast.data.sources import (  # noqa: F401  (re-exported)
    MAX_CAPTION_CHARS, Blob, Pair, PathError, Skip, list_pairs)
from declip_fast.data.write_container import _BetonFile
from declip_fast.data.write_prepare import (  # noqa: F401  (eda_seed, eda_variants, _fit: re-exported)
    CONTEXT_LENGTH, EDA_VARIANTS, _executor, _fit, _prepared, eda_seed, eda_variants, warm_up)

FIELDS = {  # field name -> (kind, dtype, shape); the order is the file's field order
    "image": ("RGBImageField", "uint8", None),
    "tokens": ("NDArrayField", "int32", (CONTEXT_LENGTH,)),
    "eda_tokens": ("NDArrayField", "int32", (EDA_VARIANTS, CONTEXT_LENGTH)),
    "index": ("IntField", "int64", ()),
}


def ffcv_fields(max_side: int = 384, jpeg_quality: int = 90) -> dict:
    """The FFCV field objects of ``FIELDS`` (ffcv is imported here, not at module import)."""
    from ffcv.fields import IntField, NDArrayField, RGBImageField

    return {
        "image": RGBImageField(write_mode="jpg", max_resolution=max_side, jpeg_quality=jpeg_quality),
        "tokens": NDArrayField(np.dtype("int32"), (CONTEXT_LENGTH,)),
        "eda_tokens": NDArrayField(np.dtype("int32"), (EDA_VARIANTS, CONTEXT_LENGTH)),
        "index": IntField(),
    }


@dataclasses.dataclass
class WriteConfig:
    max_side: int = 384  # longest image side stored
    jpeg_quality: int = 90
    upscale: bool = False  # also enlarge smaller images to max_side (bicubic); the demo uses it
    seed: int = 0  # base of the per-sample EDA seeds
    workers: int = 0  # processes preparing pairs; 0 = all cores, 1 = in the main process
    limit: int | None = None  # write at most this many pairs
    overwrite: bool = False
    progress: bool = True
    chunk_size: int = 64
    page_size: int = 1 << 23  # FFCV's default (4 x 2 MiB)


@dataclasses.dataclass
class WriteSummary:
    output: str
    written: int
    skips: list[Skip]
    seconds: float

    @property
    def skipped(self) -> int:
        return len(self.skips)

    @property
    def pairs_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def by_reason(self) -> dict[str, int]:
        return dict(collections.Counter(s.reason for s in self.skips).most_common())

    def to_json(self) -> dict:
        return {"output": self.output, "written": self.written, "skipped": self.skipped,
                "skipped_by_reason": self.by_reason(), "pairs_per_s": round(self.pairs_per_s, 2),
                "seconds": round(self.seconds, 3),
                "skips": [{"source": s.source, "reason": s.reason} for s in self.skips]}

    def format(self) -> str:
        lines = [f"written: {self.written} pairs -> {self.output}", f"skipped: {self.skipped}"]
        lines += [f"  {reason}: {n}" for reason, n in self.by_reason().items()]
        lines.append(f"pairs/s: {self.pairs_per_s:.1f} ({self.seconds:.2f} s)")
        return "\n".join(lines)


class NoPairsError(ValueError):
    """Nothing valid to write; ``summary`` says why."""

    def __init__(self, message: str, summary: WriteSummary):
        super().__init__(message)
        self.summary = summary


# -- writing ------------------------------------------------------------------------------------


def write_pairs(pairs: Sequence[Pair], out: str | os.PathLike, config: WriteConfig | None = None,
                listing_skips: Sequence[Skip] = (), started: float | None = None) -> WriteSummary:
    """Prepare ``pairs`` in parallel and write the valid ones to ``out`` (see the module docstring).

    Raises ``FileExistsError`` (OUT exists, no overwrite), :class:`PathError` (OUT cannot be
    written: one line naming the path), :class:`NoPairsError` (nothing valid to write)."""
    cfg, out = config or WriteConfig(), Path(out)
    output.check(out, cfg.overwrite)
    if started is None:
        warm_up()
        started = time.perf_counter()
    if cfg.max_side < 1:
        raise ValueError(f"max_side must be positive, got {cfg.max_side}")
    if cfg.page_size < 1 << 21 or cfg.page_size & (cfg.page_size - 1):  # FFCV finds pages by bit shifts
        raise ValueError(f"page_size must be a power of two >= 2 MiB, got {cfg.page_size}")
    capacity = len(pairs) if cfg.limit is None else max(0, min(len(pairs), cfg.limit))
    skips = list(listing_skips)
    partial, beton, (executor, window) = None, None, _executor(cfg, capacity)  # forks before any file is open
    try:
        partial = output.Partial(out)
        with output.errors(f"cannot write {out}"):
            beton = _BetonFile(partial.path, ffcv_fields(cfg.max_side, cfg.jpeg_quality), capacity, cfg.page_size)
            _fill(beton, pairs, cfg, (executor, window), capacity, skips)
            beton.close(finish=True)
        summary = WriteSummary(str(out), beton.count, skips, time.perf_counter() - started)
        if beton.count == 0:
            raise NoPairsError(f"no valid pairs to write ({len(skips)} skipped)", summary)
        partial.publish(cfg.overwrite)
    except BaseException:
        if beton is not None:
            beton.close(finish=False)
        if partial is not None:
            partial.discard()
        raise
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    return summary


def _fill(beton: _BetonFile, pairs, cfg: WriteConfig, pool, capacity: int, skips: list) -> None:
    from tqdm import tqdm

    items = _prepared(pairs, cfg, *pool)
    bar = tqdm(total=len(pairs), disable=not cfg.progress, unit="pair", file=sys.stderr, smoothing=0.1)
    try:
        for item in items:
            if isinstance(item, Skip):
                skips.append(item)
            else:
                beton.append(item)
            bar.update(1)
            if beton.count >= capacity:
                break
    finally:
        bar.close()
        items.close()


def write_dataset(source: str | os.PathLike, out: str | os.PathLike,
                  config: WriteConfig | None = None) -> WriteSummary:
    """``declip-fast write-dataset SOURCE OUT``: list the source's pairs and write them."""
    cfg = config or WriteConfig()
    output.check(Path(out), cfg.overwrite)  # before the slow part: FFCV's import, the listing
    if not os.path.exists(source):
        raise FileNotFoundError(f"no such source: {source}")
    warm_up()
    started = time.perf_counter()
    pairs, skips = list_pairs(source)
    return write_pairs(pairs, out, cfg, skips, started)


def save_summary(summary: WriteSummary, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(summary.to_json(), indent=2) + "\n")

"""Image-text pairs -> one FFCV ``.beton`` file (``declip-fast write-dataset SOURCE OUT.beton``).

This module only orchestrates: the layout (``FIELDS``, ``ffcv_fields``) is
:mod:`declip_fast.data.schema`'s, the listing :mod:`declip_fast.data.sources`', the decoding and
the caption rules :mod:`declip_fast.data.decode`'s, the per-pair work ``write_prepare``'s, the file
``write_container``'s and ``write_output``'s, the config and summary types ``write_config``'s; the
public names of all of them stay importable from here.

Each pair's ``eda_tokens`` are ``eda_variants(caption, i, seed)``, one
``random.Random(eda_seed(i, seed))`` per pair, ``i`` its position among the listed candidates
(skipped ones count), so a file is reproducible whatever the worker count.

Sources (``list_pairs``): a CSV/TSV of (image path, caption) rows, paths absolute or relative to
the table's folder, header optional (``image``/``caption`` or the aliases of ``sources``); a folder
of images with same-named ``.txt`` captions (searched recursively); webdataset tar shards as
img2dataset writes them (``key.jpg`` + ``key.txt``): one ``.tar`` or a folder of them. Enumeration
only records where the bytes are (a file, a byte range inside an uncompressed tar, or an in-memory
array). A table's malformed rows (an unterminated or stray quote, a wrong number of fields) are
skipped and named by the line their record starts on (1-based, the header is line 1); a caption
longer than ``MAX_CAPTION_CHARS`` (16,384 characters) is skipped as ``caption too long``, from any
source. Every skip is counted by reason in the summary.

How it runs:

- Workers (``write_prepare``: a process pool, forked after the tokenizer and the WordNet table
  are built, so they share them, and before the output file is opened) prepare chunks of pairs:
  caption checks and image decoding (``decode``: by content, the extension is never trusted;
  large JPEGs at a reduced DCT scale, still >= the target size; alpha composited on white),
  shrinking (``_fit``), JPEG encoding, EDA, and one tokenizer call per chunk. Bad input
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

import os
import sys
import time
from pathlib import Path
from typing import Sequence

from declip_fast.data import write_output as output
from declip_fast.data.schema import (  # noqa: F401  (re-exported)
    CONTEXT_LENGTH,
    EDA_VARIANTS,
    FIELDS,
    MAX_CAPTION_CHARS,
    ffcv_fields,
)
from declip_fast.data.sources import Blob, Pair, PathError, Skip, list_pairs  # noqa: F401  (re-exported)
from declip_fast.data.write_config import (  # noqa: F401  (re-exported)
    NoPairsError,
    WriteConfig,
    WriteSummary,
    save_summary,
)
from declip_fast.data.write_container import _BetonFile
from declip_fast.data.write_prepare import (  # noqa: F401  (eda_seed, eda_variants, _fit: re-exported)
    _executor,
    _fit,
    _prepared,
    eda_seed,
    eda_variants,
    warm_up,
)


# -- writing ------------------------------------------------------------------------------------


def write_pairs(
    pairs: Sequence[Pair],
    out: str | os.PathLike,
    config: WriteConfig | None = None,
    listing_skips: Sequence[Skip] = (),
    started: float | None = None,
) -> WriteSummary:
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


def write_dataset(source: str | os.PathLike, out: str | os.PathLike, config: WriteConfig | None = None) -> WriteSummary:
    """``declip-fast write-dataset SOURCE OUT``: list the source's pairs and write them."""
    cfg = config or WriteConfig()
    output.check(Path(out), cfg.overwrite)  # before the slow part: FFCV's import, the listing
    if not os.path.exists(source):
        raise FileNotFoundError(f"no such source: {source}")
    warm_up()
    started = time.perf_counter()
    pairs, skips = list_pairs(source)
    return write_pairs(pairs, out, cfg, skips, started)

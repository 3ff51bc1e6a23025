"""The writer's worker side: one chunk of pairs -> skips or ready-to-store samples.

Runs in the worker processes of ``declip_fast.data.write`` (or in the main process with one
worker): caption checks and image decoding (:mod:`declip_fast.data.decode`, the rules the fallback
loader and eval share), shrinking (``_fit``), JPEG encoding, EDA and one tokenizer call per chunk.
Bad input becomes a :class:`Skip` with a reason; a worker never raises for it. Workers die with
the process that started them (``_worker_init``).
"""

from __future__ import annotations

import collections
import math
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

import numpy as np

from declip_fast.data.decode import BadSample, caption_text, load_pixels
from declip_fast.data.schema import CONTEXT_LENGTH, EDA_VARIANTS
from declip_fast.data.sources import Pair, Skip
from declip_fast.data.write_config import WriteConfig

_WINDOW_PER_WORKER = 4  # chunks in flight per worker: enough to keep workers busy, bounded memory
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def eda_seed(position: int, seed: int = 0) -> int:
    """Seed of the EDA generator of the pair at ``position`` in the source."""
    return seed * 1_000_000_007 + position


def eda_variants(caption: str, position: int, seed: int = 0, table=None) -> list[str]:
    """The EDA_VARIANTS EDA views stored for a caption (the same every time)."""
    from .eda import eda, synonym_table

    table = synonym_table() if table is None else table
    rng = random.Random(eda_seed(position, seed))
    return [eda(caption, rng, table) for _ in range(EDA_VARIANTS)]


def _fit(image: np.ndarray, max_side: int, upscale: bool) -> np.ndarray:
    """FFCV's size rule (longest side -> max_side, sides truncated), never a 0-pixel side.

    Filters: FFCV's INTER_AREA below half size (anti-aliasing matters there), bicubic from half size
    up (and for upscaling). On a shrink by a fractional ratio (500x375 -> 384x288) bicubic is both
    several times faster than INTER_AREA and the closest of cv2's filters to Lanczos, where
    INTER_AREA is further from it. JPEGs arrive already DCT-scaled to within 2x of the target
    (``decode.decode_image``), so most shrinks take the fast filter.
    """
    import cv2

    height, width = image.shape[:2]
    ratio = max_side / max(height, width)
    if ratio == 1 or (ratio > 1 and not upscale):
        return np.ascontiguousarray(image)
    size = (max(1, int(ratio * width)), max(1, int(ratio * height)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if ratio < 0.5 else cv2.INTER_CUBIC)
    return np.ascontiguousarray(image)


def _image(raw, cfg: WriteConfig) -> tuple[np.ndarray, int, int]:
    """(JPEG bytes as uint8, height, width), encoded by FFCV's own ``encode_jpeg``."""
    from ffcv.fields.rgb_image import encode_jpeg

    image = _fit(load_pixels(raw, min_longest_side=cfg.max_side), cfg.max_side, cfg.upscale)
    jpeg = encode_jpeg(image, cfg.jpeg_quality)
    if jpeg.nbytes + (1 + EDA_VARIANTS) * CONTEXT_LENGTH * 4 > cfg.page_size:  # a sample fits one page
        raise BadSample("image too large")
    return jpeg, image.shape[0], image.shape[1]


def _prepare_chunk(start: int, pairs: Sequence[Pair], cfg: WriteConfig) -> list:
    """Per pair, in order: ``Skip`` or (jpeg, height, width, tokens [77], eda_tokens [4, 77])."""
    from .eda import synonym_table
    from .tokenizer import get_tokenizer

    table, out, texts = synonym_table(), [], []
    for position, pair in enumerate(pairs, start=start):
        try:
            caption = caption_text(pair.caption)
            jpeg = _image(pair.image, cfg)
        except BadSample as bad:
            out.append(Skip(pair.source, str(bad)))
            continue
        except Exception as err:  # unforeseen input: counted and named, never the end of the write
            out.append(Skip(pair.source, f"failed ({type(err).__name__}: {err})"))
            continue
        out.append(jpeg)
        texts += [caption, *eda_variants(caption, position, cfg.seed, table)]
    tokens = get_tokenizer()(texts).numpy().astype(np.int32) if texts else None
    tokens = tokens.reshape(-1, 1 + EDA_VARIANTS, CONTEXT_LENGTH) if texts else None
    result, row = [], 0
    for pair, item in zip(pairs, out):
        if isinstance(item, Skip):
            result.append(item)
        elif tokens[row, 0, 2] == 0 and tokens[row, 0, 1] != 0:  # start, end, nothing: no words
            result.append(Skip(pair.source, "empty caption"))
            row += 1
        else:
            result.append((*item, tokens[row, 0], tokens[row, 1:]))
            row += 1
    return result


def _worker_init(parent: int) -> None:
    """Set up a worker of the process ``parent``: one cv2 thread, no Ctrl-C, death with the parent."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from the processes


def _die_with_parent(parent: int) -> None:
    """End this process when ``parent`` ends, however it ends.

    A writer killed outright (SIGKILL, the OOM killer) runs no cleanup; its workers would otherwise
    wait on the task queue forever, since each holds the queue's pipe open for the others. On Linux
    the kernel sends SIGKILL (``PR_SET_PDEATHSIG``) when the thread that forked the worker ends: the
    pool starts all its workers from the thread that calls ``write_pairs``, which outlives the pool.
    Elsewhere a daemon thread polls the parent id once a second.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if armed:
            if os.getppid() != parent:  # the parent died before the signal was armed
                os._exit(1)
            return
    threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _prepared(pairs: Sequence[Pair], cfg: WriteConfig, executor: ProcessPoolExecutor | None, window: int):
    """``_prepare_chunk`` results pair by pair, in source order; at most ``window`` chunks in flight."""
    size = max(1, cfg.chunk_size)
    starts = iter(range(0, len(pairs), size))
    if executor is None:
        for start in starts:
            yield from _prepare_chunk(start, pairs[start : start + size], cfg)
        return
    pending: collections.deque = collections.deque()

    def submit() -> None:
        start = next(starts, None)
        if start is not None:
            pending.append(executor.submit(_prepare_chunk, start, pairs[start : start + size], cfg))

    for _ in range(window):
        submit()
    while pending:
        results = pending.popleft().result()
        submit()
        yield from results


def warm_up() -> None:
    """Import FFCV (~10 s: numba) and build the tokenizer and WordNet table (~2 s), once per process.

    Done before the clock starts, so ``pairs_per_s`` measures the data, not the imports."""
    import ffcv.writer  # noqa: F401
    from ffcv.fields import rgb_image  # noqa: F401

    from .eda import synonym_table
    from .tokenizer import get_tokenizer

    get_tokenizer(), synonym_table()


def _executor(cfg: WriteConfig, n_pairs: int) -> tuple[ProcessPoolExecutor | None, int]:
    """(the worker pool, or None to work in this process; how many chunks to keep in flight)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(cfg.workers if cfg.workers > 0 else cores, math.ceil(n_pairs / max(1, cfg.chunk_size)))
    if workers <= 1:
        return None, 0
    warm_up()  # before forking, so every worker shares it instead of building its own
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(os.getpid(),))
    try:
        pool.submit(int).result()  # forks the workers now, before the output file is open
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    return pool, workers * _WINDOW_PER_WORKER

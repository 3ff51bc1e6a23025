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

How it runs:

- Workers (a process pool, forked after the tokenizer and the WordNet table are built, so they
  share them) prepare chunks of pairs: caption checks, image decoding by content (the extension is
  never trusted; large JPEGs are decoded at a reduced DCT scale, still >= the target size), RGB
  conversion (alpha composited on white), shrinking (``_fit``), JPEG encoding, EDA, and one
  tokenizer call per chunk. Bad input becomes a skip with a reason; a worker never raises for it.
- The main process takes the chunks back in source order (a bounded window of futures, so memory
  stays flat) and appends them with FFCV's own page allocator (``MemoryAllocator`` and
  ``handle_sample``); header, field table, metadata and allocation table are laid out as
  ``ffcv.writer.DatasetWriter`` lays them out. The file is byte-identical whatever the worker count.
- Why not ``DatasetWriter.from_indexed_dataset``: it must know the sample count before it starts
  (we know it only after decoding, since bad pairs are dropped) and its workers encode the images;
  skipping bad pairs with it would mean decoding everything twice. Its metadata also lives in
  /dev/shm, and a worker that raises leaves its progress loop waiting forever. Here the metadata
  region is reserved for every candidate; the header counts only the written ones (the rest is a
  few bytes of slack per skipped pair), and a crashed worker raises ``BrokenProcessPool``.
- The output is written under a hidden temporary name in the destination folder and renamed when
  complete, so an interrupted or failed write never leaves a file that looks finished.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import multiprocessing
import os
import random
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

CONTEXT_LENGTH = 77
EDA_VARIANTS = 4
FIELDS = {  # field name -> (kind, dtype, shape); the order is the file's field order
    "image": ("RGBImageField", "uint8", None),
    "tokens": ("NDArrayField", "int32", (CONTEXT_LENGTH,)),
    "eda_tokens": ("NDArrayField", "int32", (EDA_VARIANTS, CONTEXT_LENGTH)),
    "index": ("IntField", "int64", ()),
}
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")
_WINDOW_PER_WORKER = 4  # chunks in flight per worker: enough to keep workers busy, bounded memory

from declip_fast.data.sources import Blob, Pair, Skip, list_pairs  # noqa: F401  (re-exported)


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


# -- sources ------------------------------------------------------------------------------------


class _Bad(Exception):
    """A pair that cannot be written; the message is the skip reason."""


def eda_seed(position: int, seed: int = 0) -> int:
    """Seed of the EDA generator of the pair at ``position`` in the source."""
    return seed * 1_000_000_007 + position


def eda_variants(caption: str, position: int, seed: int = 0, table=None) -> list[str]:
    """The EDA_VARIANTS EDA views stored for a caption (the same every time)."""
    from .eda import eda, synonym_table

    table = synonym_table() if table is None else table
    rng = random.Random(eda_seed(position, seed))
    return [eda(caption, rng, table) for _ in range(EDA_VARIANTS)]


def _read(blob: Blob, what: str) -> bytes:
    try:
        with open(blob.path, "rb") as f:
            f.seek(blob.offset)
            data = f.read() if blob.size is None else f.read(blob.size)
    except FileNotFoundError:
        raise _Bad(f"missing {what}") from None
    except OSError:
        raise _Bad(f"unreadable {what}") from None
    if blob.size is not None and len(data) < blob.size:  # a tar member cut short
        raise _Bad(f"truncated {what}")
    return data


def _caption(raw) -> str:
    if raw is None:
        raise _Bad("missing caption")
    if isinstance(raw, Blob):
        raw = _read(raw, "caption")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad("caption not utf-8") from None
    try:
        raw.encode("utf-8")  # lone surrogates: bytes a table could not decode
    except UnicodeEncodeError:
        raise _Bad("caption not utf-8") from None
    text = raw.lstrip("\ufeff").strip()
    if not text:
        raise _Bad("empty caption")
    return text


def _decode(data: bytes, max_side: int) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise _Bad("empty image file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            ratio = max_side / max(im.size)
            if ratio < 1:  # JPEG: decode at 1/2..1/8 scale, still at least the target size
                im.draft("RGB", (math.ceil(im.size[0] * ratio), math.ceil(im.size[1] * ratio)))
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # a broken EXIF block: keep the pixels as stored
                pass
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except UnidentifiedImageError:
        raise _Bad("truncated image" if data.startswith(_IMAGE_MAGIC) else "not an image") from None
    except Image.DecompressionBombError:
        raise _Bad("image too large") from None
    except Exception as err:  # any decoder complaint about the bytes
        raise _Bad("truncated image" if "runcated" in str(err) else "corrupt image") from None


def _fit(image: np.ndarray, max_side: int, upscale: bool) -> np.ndarray:
    """FFCV's size rule (longest side -> max_side, sides truncated), never a 0-pixel side.

    Filters: FFCV's INTER_AREA below half size (anti-aliasing matters there), bicubic from half size
    up (and for upscaling). Measured here on a 500x375 -> 384x288 shrink: bicubic 0.65 ms and the
    closest of cv2's filters to Lanczos; INTER_AREA at that fractional ratio 3.9 ms, and further from
    it. JPEGs arrive already DCT-scaled to within 2x of the target (``_decode``), so most shrinks
    take the fast filter.
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

    if raw is None:
        raise _Bad("missing image")
    if isinstance(raw, np.ndarray):
        image = raw if raw.ndim == 3 else np.repeat(raw[:, :, None], 3, axis=2)
    else:
        image = _decode(_read(raw, "image"), cfg.max_side)
    image = _fit(image.astype(np.uint8, copy=False), cfg.max_side, cfg.upscale)
    jpeg = encode_jpeg(image, cfg.jpeg_quality)
    if jpeg.nbytes + (1 + EDA_VARIANTS) * CONTEXT_LENGTH * 4 > cfg.page_size:  # a sample fits one page
        raise _Bad("image too large")
    return jpeg, image.shape[0], image.shape[1]


def _prepare_chunk(start: int, pairs: Sequence[Pair], cfg: WriteConfig) -> list:
    """Per pair, in order: ``Skip`` or (jpeg, height, width, tokens [77], eda_tokens [4, 77])."""
    from .eda import synonym_table
    from .tokenizer import get_tokenizer

    table, out, texts = synonym_table(), [], []
    for position, pair in enumerate(pairs, start=start):
        try:
            caption = _caption(pair.caption)
            jpeg = _image(pair.image, cfg)
        except _Bad as bad:
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


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from the processes


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
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init)
    return pool, workers * _WINDOW_PER_WORKER


# -- the .beton container (main process) --------------------------------------------------------


class _PreparedJpeg:
    """``RGBImageField.encode`` in 'jpg' mode, for a JPEG a worker already made (same metadata)."""

    @staticmethod
    def encode(destination, value, malloc) -> None:
        from ffcv.fields.rgb_image import IMAGE_MODES

        jpeg, height, width = value
        destination["mode"] = IMAGE_MODES["jpg"]
        destination["height"], destination["width"] = height, width
        destination["data_ptr"], storage = malloc(jpeg.nbytes)
        storage[:] = jpeg


class _BetonFile:
    """FFCV's file layout (header, field table, metadata, pages, allocation table), appended to."""

    def __init__(self, path: Path, fields: dict, capacity: int, page_size: int):
        from ffcv.memory_allocator import MemoryAllocator
        from ffcv.types import CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType, get_metadata_type

        self.path, self.count, self.closed = path, 0, False
        self.metadata = np.zeros(max(capacity, 1), get_metadata_type(list(fields.values())))
        self.encoders = dict(fields, image=_PreparedJpeg)
        descriptors = np.zeros(len(fields), FieldDescType)
        type_ids = {handler: i for i, handler in TYPE_ID_HANDLER.items()}
        for i, (name, field) in enumerate(fields.items()):
            descriptors[i]["type_id"] = type_ids[type(field)]
            descriptors[i]["name"][: len(name)] = np.frombuffer(name.encode("ascii"), "<u1")
            descriptors[i]["arguments"][:] = field.to_binary()[0]
        self.header = np.zeros(1, HeaderType)[0]
        self.header["version"], self.header["num_fields"] = CURRENT_VERSION, len(fields)
        self.header["page_size"] = page_size
        self.metadata_start = HeaderType.itemsize + descriptors.nbytes
        with open(path, "wb") as f:
            f.write(self.header.tobytes())
            f.write(descriptors.tobytes())
        self.allocator = MemoryAllocator(str(path), self.metadata_start + self.metadata.nbytes, page_size)
        self.allocator.__enter__()  # opens the file for appending pages

    def append(self, prepared) -> None:
        from ffcv.writer import handle_sample

        jpeg, height, width, tokens, eda_tokens = prepared
        sample = ((jpeg, height, width), np.ascontiguousarray(tokens, np.int32),
                  np.ascontiguousarray(eda_tokens, np.int32), self.count)
        handle_sample(sample, self.count, self.metadata.dtype.names, self.metadata, self.allocator,
                      self.encoders)
        self.count += 1

    def close(self, finish: bool) -> None:
        """``finish``: write the last page and the tables; otherwise just let go of the file."""
        from ffcv.types import ALLOC_TABLE_TYPE

        if self.closed:
            return
        self.closed = True
        if not finish:
            self.allocator.fp.close()
            return
        self.allocator.__exit__(None, None, None)  # writes the last page, closes the file
        with open(self.path, "r+b") as f:
            f.seek(self.metadata_start)
            f.write(self.metadata[: self.count].tobytes())
            table_ptr = f.seek(0, os.SEEK_END)
            f.write(np.array(self.allocator.allocations, dtype=ALLOC_TABLE_TYPE).tobytes())
            self.header["num_samples"], self.header["alloc_table_ptr"] = self.count, table_ptr
            f.seek(0)
            f.write(self.header.tobytes())


# -- writing ------------------------------------------------------------------------------------


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished file into place (without overwrite, never over a file that appeared)."""
    if overwrite:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)  # fails if ``out`` exists, atomically
    except FileExistsError:
        raise FileExistsError(f"{out} appeared during the write; pass overwrite=True to replace it") from None
    except OSError:  # a filesystem without hard links
        _check_out(out, overwrite)
        os.replace(tmp, out)
        return
    tmp.unlink()


def write_pairs(pairs: Sequence[Pair], out: str | os.PathLike, config: WriteConfig | None = None,
                listing_skips: Sequence[Skip] = (), started: float | None = None) -> WriteSummary:
    """Prepare ``pairs`` in parallel and write the valid ones to ``out`` (see the module docstring)."""
    cfg, out = config or WriteConfig(), Path(out)
    _check_out(out, cfg.overwrite)
    if started is None:
        warm_up()
        started = time.perf_counter()
    if cfg.max_side < 1:
        raise ValueError(f"max_side must be positive, got {cfg.max_side}")
    if cfg.page_size < 1 << 21 or cfg.page_size & (cfg.page_size - 1):  # FFCV finds pages by bit shifts
        raise ValueError(f"page_size must be a power of two >= 2 MiB, got {cfg.page_size}")
    capacity = len(pairs) if cfg.limit is None else max(0, min(len(pairs), cfg.limit))
    skips = list(listing_skips)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{os.urandom(4).hex()}.partial"
    beton, (executor, window) = None, _executor(cfg, capacity)  # forks before any file is open
    try:
        beton = _BetonFile(tmp, ffcv_fields(cfg.max_side, cfg.jpeg_quality), capacity, cfg.page_size)
        _fill(beton, pairs, cfg, (executor, window), capacity, skips)
        beton.close(finish=True)
        summary = WriteSummary(str(out), beton.count, skips, time.perf_counter() - started)
        if beton.count == 0:
            raise NoPairsError(f"no valid pairs to write ({len(skips)} skipped)", summary)
        _publish(tmp, out, cfg.overwrite)
    except BaseException:
        if beton is not None:
            beton.close(finish=False)
        tmp.unlink(missing_ok=True)
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
    _check_out(Path(out), cfg.overwrite)
    warm_up()
    started = time.perf_counter()
    pairs, skips = list_pairs(source)
    return write_pairs(pairs, out, cfg, skips, started)


def save_summary(summary: WriteSummary, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(summary.to_json(), indent=2) + "\n")

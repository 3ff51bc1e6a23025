"""Reading a ``.beton`` without hanging or trusting it: a check at open, a guarded loader thread.

FFCV 1.0.2 trusts its file: the header's sample count sizes the metadata it reads (a count 1000x
too large asks for terabytes), and every pointer is followed as is (past the end of the file: an
``IndexError`` in the loader thread, or garbage once numba compiles the reader). :func:`check_beton`
checks the header, field table, metadata and allocation table against the file's size before FFCV
opens it, and refuses a file that does not fit with a ``ValueError`` of one line naming the file
and the fault.

FFCV's loader thread (``EpochIterator``) catches only ``StopIteration``: any other exception ends
the thread and the consumer waits on its queue forever. :func:`start_epoch` runs an epoch in a
thread that hands its exception to the consumer, which raises :class:`LoaderThreadError` (the
original's type and first line in the message, the original as ``__cause__``); a thread that dies
without a word is noticed within ``POLL_S`` seconds too. FFCV is imported inside the functions
(an optional dependency).
"""

from __future__ import annotations

import os

import numpy as np

POLL_S = 1.0  # how often a waiting consumer checks that the loader thread is alive
MAX_SIDE = 65535  # JPEG's limit on a side; a larger claim is a damaged record


class LoaderThreadError(RuntimeError):
    """FFCV's loader thread failed; ``__cause__`` is its exception, with the thread's traceback."""


def _fail(path, what: str):
    raise ValueError(f"{path}: {what}; rewrite it with declip_fast.data.write")


def _header(path, size: int):
    """(header, field descriptors, metadata dtype, metadata start) after checking they fit."""
    from ffcv.types import CURRENT_VERSION, FieldDescType, HeaderType, get_handlers, get_metadata_type

    if size < HeaderType.itemsize:
        _fail(path, f"{size} bytes, shorter than FFCV's {HeaderType.itemsize}-byte header")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        _fail(path, f"format version {int(header['version'])}, FFCV reads version {CURRENT_VERSION}")
    num_fields = int(header["num_fields"])
    meta_start = HeaderType.itemsize + num_fields * FieldDescType.itemsize
    if num_fields == 0 or meta_start > size:
        _fail(path, f"the header's {num_fields} field descriptors do not fit the file ({size} bytes)")
    page = int(header["page_size"])
    if page < 1 or page & (page - 1):
        _fail(path, f"page size {page} is not a power of two")
    fields = np.fromfile(path, dtype=FieldDescType, count=num_fields, offset=HeaderType.itemsize)
    try:
        handlers = get_handlers(fields)
        if any(h is None for h in handlers):
            raise KeyError("a custom field")
        meta_type = get_metadata_type(handlers)
    except Exception as err:  # an unknown type id (KeyError) or arguments that do not parse
        _fail(path, f"unreadable field table ({type(err).__name__}: {err})")
    return header, fields, handlers, meta_type, meta_start


def check_beton(path: str | os.PathLike) -> None:
    """Refuse (``ValueError``, one line) a ``.beton`` whose header, metadata or pointers do not
    fit the file: sample count x record size beyond the file, an allocation table outside it or
    pointing past the data, a sample pointing to no allocated region, or an image of zero (or
    more than 65535 px) side, an unknown mode, or raw pixels larger than their region."""
    from ffcv.types import ALLOC_TABLE_TYPE
    from ffcv.utils import decode_null_terminated_string

    size = os.path.getsize(path)
    header, fields, handlers, meta_type, meta_start = _header(path, size)
    count, table_ptr = int(header["num_samples"]), int(header["alloc_table_ptr"])
    meta_end = meta_start + count * meta_type.itemsize
    claims = f"the header claims {count} samples of {meta_type.itemsize} metadata bytes (to byte {meta_end})"
    if meta_end > size:
        _fail(path, f"{claims}, beyond the file's {size} bytes")
    if not meta_start <= table_ptr <= size or (size - table_ptr) % ALLOC_TABLE_TYPE.itemsize:
        _fail(
            path,
            f"the allocation table at byte {table_ptr} does not fit between the metadata "
            f"(from byte {meta_start}) and the end of the file ({size} bytes)",
        )
    table = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table_ptr)
    ptrs, sizes = table["ptr"].astype(np.int64), table["size"].astype(np.int64)
    data_start = min(int(table["ptr"].min()) if len(table) else table_ptr, table_ptr)
    if meta_end > data_start:
        _fail(path, f"{claims}, past the start of the data at byte {data_start}")
    bad = np.flatnonzero((ptrs < meta_end) | (ptrs + sizes > table_ptr) | (table["ptr"] > size))
    if bad.size:
        k = int(bad[0])
        _fail(
            path,
            f"allocation {k} (byte {int(table['ptr'][k])}, {int(table['size'][k])} bytes) lies "
            f"outside the data region (bytes {meta_end}..{table_ptr}) ({bad.size} such)",
        )
    metadata = np.memmap(path, dtype=meta_type, mode="r", offset=meta_start, shape=(count,)) if count else []
    order = np.argsort(ptrs, kind="stable")
    for f, (handler, desc) in enumerate(zip(handlers, fields)):
        name = decode_null_terminated_string(desc["name"])
        meta = metadata[f"f{f}"] if count else None
        if meta is not None and "data_ptr" in (meta.dtype.names or ()):
            _check_records(path, name, handler, meta, ptrs[order], sizes[order])


def _check_records(path, name: str, handler, meta, ptrs, sizes) -> None:
    """Every sample's pointer of field ``name`` is an allocated region large enough for it."""
    data_ptr = meta["data_ptr"].astype(np.int64)
    at = np.minimum(np.searchsorted(ptrs, data_ptr), max(len(ptrs) - 1, 0))
    region = np.where(ptrs[at] == data_ptr, sizes[at], -1) if len(ptrs) else np.full(len(meta), -1)
    need = np.zeros(len(meta), np.int64)
    faults = [(region < 0, "points to no allocated region (past the end of the data?)")]
    if "height" in meta.dtype.names:  # RGBImageField
        height, width = meta["height"].astype(np.int64), meta["width"].astype(np.int64)
        mode = meta["mode"]
        need = np.where(mode == 1, 3 * height * width, 0)
        faults += [
            ((height == 0) | (width == 0), "has an image with a zero dimension"),
            ((height > MAX_SIDE) | (width > MAX_SIDE), f"has an image side above {MAX_SIDE} px"),
            (mode > 1, "has an unknown image mode"),
        ]
    elif hasattr(handler, "shape") and hasattr(handler, "dtype"):  # NDArrayField
        need[:] = int(np.prod(handler.shape)) * np.dtype(handler.dtype).itemsize
    faults.append(((region >= 0) & (region < need), "holds fewer bytes than its record needs"))
    for mask, what in faults:
        rows = np.flatnonzero(mask)
        if rows.size:
            _fail(path, f"sample {int(rows[0])} (of {rows.size} such) {what} in field '{name}'")


def start_epoch(loader):
    """Like ``iter(loader)`` for an FFCV ``Loader``, with a :func:`guarded_iterator_class`
    thread; its ``__next__`` returns ``(slot, outputs)`` (the slot locates the batch's buffers)."""
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_num_threads(loader.num_workers)
    order = loader.next_traversal_order()[: len(loader) * loader.batch_size]
    loader.next_epoch += 1
    if loader.code is None or loader.recompile:
        loader.generate_code()
    return guarded_iterator_class()(loader, order)


_GUARDED = None


class _Failure:
    """What a failed loader thread puts on its queue for the consumer."""

    def __init__(self, error: BaseException):
        self.error = error

    def raise_for(self, file_name: str):
        line = (str(self.error).strip().splitlines() or [""])[0]
        raise LoaderThreadError(
            f"{file_name}: FFCV's loader thread failed: {type(self.error).__name__}: {line}"
        ) from self.error


def guarded_iterator_class():
    """FFCV's ``EpochIterator``, its thread's exceptions handed to the consumer (built once, on
    first use, so that FFCV is imported only when used)."""
    global _GUARDED
    if _GUARDED is not None:
        return _GUARDED
    from queue import Empty, Full

    from ffcv.loader.epoch_iterator import IS_CUDA, EpochIterator

    class GuardedEpochIterator(EpochIterator):
        def run(self):
            try:
                super().run()
            except BaseException as err:  # everything: the consumer must hear of it
                while not self.terminate_event.is_set():
                    try:
                        self.output_queue.put(_Failure(err), timeout=0.5)
                        return
                    except Full:
                        pass

        def _get(self):
            while True:
                try:
                    return self.output_queue.get(timeout=POLL_S)
                except Empty:
                    if self.is_alive():
                        continue
                try:  # it may have handed over its last item as it ended
                    return self.output_queue.get_nowait()
                except Empty:
                    raise LoaderThreadError("FFCV's loader thread ended without a batch or an error") from None

        def __next__(self):
            item = self._get()
            if item is None or isinstance(item, _Failure):
                self.close()
                if item is None:
                    raise StopIteration
                item.raise_for(self.loader.reader.file_name)
            slot, result = item
            if IS_CUDA:
                self.current_stream.wait_stream(self.cuda_streams[slot])
            return slot, result

        def close(self):
            self.terminate_event.set()
            if not self.closed:
                self.closed = True
                self.memory_context.__exit__(None, None, None)

    _GUARDED = GuardedEpochIterator
    return _GUARDED

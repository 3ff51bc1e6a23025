"""FFCV's ``.beton`` layout, as ``declip_fast.data.write``'s main process writes it.

Header, field table, metadata and allocation table as ``ffcv.writer.DatasetWriter`` lays them
out; samples appended with FFCV's own page allocator (``MemoryAllocator`` and ``handle_sample``).
FFCV is imported inside the functions (an optional dependency).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


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
        sample = (
            (jpeg, height, width),
            np.ascontiguousarray(tokens, np.int32),
            np.ascontiguousarray(eda_tokens, np.int32),
            self.count,
        )
        handle_sample(sample, self.count, self.metadata.dtype.names, self.metadata, self.allocator, self.encoders)
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

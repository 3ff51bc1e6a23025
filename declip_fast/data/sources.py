"""Where image-text pairs come from: listing a source without reading its images.

Sources: a CSV/TSV of (image path relative to the table's folder or absolute, caption), with or
without an ``image``/``caption`` header; a folder of images with same-named ``.txt`` captions;
webdataset tar shards as img2dataset writes them (``key.jpg`` + ``key.txt``), one ``.tar`` or a
folder of them. Listing only records where the bytes are (:class:`Blob`); decoding
(:mod:`declip_fast.data.decode`), and the skips it finds, happen in the writer's workers or the
fallback loader's. Problems found while listing (a malformed row, an image without a caption, an
unreadable tar) are returned as :class:`Skip` records; a table's skips name the line its record
starts on (1-based, the header is line 1: what an editor shows).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import os
import tarfile
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from declip_fast.data.schema import IMAGE_EXTENSIONS, MAX_CAPTION_CHARS  # also imported from here

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


class PathError(OSError, ValueError):
    """A file or folder the job needs cannot be read or written; the message (one line) names it.

    An ``OSError`` (``errno`` is the cause's), and a ``ValueError`` too, so that callers which report
    bad arguments in one line, the CLI among them, report this the same way instead of a traceback.
    """

    @classmethod
    def of(cls, what: str, err: OSError) -> "PathError":
        reason = err.strerror or str(err) or type(err).__name__
        if isinstance(err, FileExistsError):  # mkdir over a file
            reason = "not a folder"
        new = cls(f"{what}: {reason}")
        new.errno = err.errno if err.errno is not None else errno.EIO
        return new


def list_pairs(source: str | os.PathLike) -> tuple[list[Pair], list[Skip]]:
    """The candidate pairs of a source, in source order, and what was skipped while listing it.

    Raises ``FileNotFoundError`` for a source that is not there, ``ValueError`` for one of no known
    kind and :class:`PathError` (one line naming the file) for one that cannot be read."""
    src = Path(source)
    try:
        if src.is_dir():
            shards = sorted(p for p in src.iterdir() if p.suffix == ".tar" and p.is_file())
            return _tar_pairs(shards) if shards else _folder_pairs(src)
        if not src.is_file():
            raise FileNotFoundError(f"no such source: {src}")
        if src.suffix == ".tar":
            return _tar_pairs([src])
        if src.suffix.lower() in (".csv", ".tsv"):
            return _table_pairs(src)
    except (FileNotFoundError, PathError):
        raise
    except OSError as err:  # unreadable folder or table: a permission, an I/O error, a name too long
        raise PathError.of(f"cannot read the source {src}", err) from err
    raise ValueError(f"unknown source kind {src} (want a .csv/.tsv table, a .tar shard or a folder)")


# -- tables -------------------------------------------------------------------------------------


def _table_pairs(path: Path) -> tuple[list[Pair], list[Skip]]:
    """Rows of a CSV/TSV; a skip names the line its record starts on (1-based, the header is line 1).

    The table is cut into records by ``csv`` in strict mode, one record at a time, so that a record
    ``csv`` rejects costs only its first line: the next record is read from the line after it. What
    a record cannot be, and is skipped as (reasons ``malformed row (...)``):

    - ``unterminated quote``: a quoted field still open at the end of the file, or a quoted field
      spanning lines of which one reads as a row of its own (``img.jpg,caption``): an opening quote
      without its closing one that swallowed the rows after it. A quoted newline in a caption is
      fine otherwise (the record spans two lines; it is named by the first);
    - ``stray quote``: a closing quote followed by more text (``"a "b" c"``);
    - ``wrong number of fields``: fewer fields than the image and caption columns need, or more
      non-empty ones than the header has (two without a header): an unquoted delimiter in a caption
      would otherwise cut the caption short without a word;
    - ``no image path``: an empty image cell.

    A caption longer than ``MAX_CAPTION_CHARS`` is skipped as ``caption too long``. ``csv``'s own
    field limit (131,072 characters, which aborts the whole read) is lifted while reading.
    """
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # surrogateescape: a row with bad bytes is skipped as "caption not utf-8", not the whole file;
    # newline="": lines end at \n, \r or \r\n, as csv counts them, and quoted newlines stay as written
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        lines = f.readlines()
    table = _Table(lines, delimiter)
    with _csv_field_limit(sum(map(len, lines)) + 1):
        records = table.records()
    pairs: list[Pair] = []
    skips: list[Skip] = []
    for line, row, problem in records:
        source = f"{path}:{line}"
        if problem is not None:
            skips.append(Skip(source, f"malformed row ({problem})"))
            continue
        image = Path(row[table.image_col].strip())
        image = image if image.is_absolute() else path.parent / image
        caption = row[table.caption_col]
        if len(caption.strip()) > MAX_CAPTION_CHARS:
            skips.append(Skip(f"{source} {image}", "caption too long"))
            continue
        pairs.append(Pair(f"{source} {image}", Blob(str(image)), caption))
    return pairs, skips


class _Table:
    """A table's records: (first line, fields, None) or (first line, None, what is wrong)."""

    def __init__(self, lines: list[str], delimiter: str):
        self.lines, self.delimiter, self.pos = lines, delimiter, 0
        self.image_col, self.caption_col, self.width = 0, 1, 2  # no header: image, caption

    def __iter__(self):  # the lines csv.reader asks for, one at a time, from ``pos``
        return self

    def __next__(self) -> str:
        if self.pos >= len(self.lines):
            raise StopIteration
        self.pos += 1
        return self.lines[self.pos - 1]

    def records(self) -> list[tuple[int, list[str] | None, str | None]]:
        reader = csv.reader(self, delimiter=self.delimiter, strict=True)
        records, first = [], True
        while self.pos < len(self.lines):
            start = self.pos
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as err:  # resume on the line after the record's first
                # at the end of the file, or past its first line: a quote opened and never closed
                unterminated = self.pos - start > 1 or "end of data" in str(err)
                problem = "unterminated quote" if unterminated else "stray quote"
                self.pos, first = start + 1, False
                records.append((start + 1, None, problem))
                continue
            if first and self._header(row):
                first = False
                continue
            first = False
            if not any(cell.strip() for cell in row):
                continue  # a blank line
            problem = self._problem(row, start)
            if problem == "unterminated quote":
                self.pos = start + 1
            records.append((start + 1, None if problem else row, problem))
        return records

    def _header(self, row: list[str]) -> bool:
        names = [cell.strip().lower() for cell in row]
        image = [i for i, name in enumerate(names) if name in IMAGE_COLUMNS]
        caption = [i for i, name in enumerate(names) if name in CAPTION_COLUMNS]
        if image and caption:
            self.image_col, self.caption_col = image[0], caption[0]
            self.width = max(len(_trimmed(row)), self.image_col + 1, self.caption_col + 1)
        return bool(image and caption)

    def _problem(self, row: list[str], start: int) -> str | None:
        if self.pos - start > 1 and any(self._looks_like_row(line) for line in self.lines[start + 1 : self.pos]):
            return "unterminated quote"
        if len(row) <= max(self.image_col, self.caption_col) or len(_trimmed(row)) > self.width:
            return "wrong number of fields"
        if not row[self.image_col].strip():
            return "no image path"
        return None

    def _looks_like_row(self, line: str) -> bool:
        """Whether a line inside a quoted field reads as a table row naming an image file."""
        if self.delimiter not in line:
            return False
        try:
            cells = next(csv.reader([line], delimiter=self.delimiter))
        except csv.Error:
            return False
        return len(cells) > self.image_col and Path(cells[self.image_col].strip()).suffix.lower() in IMAGE_EXTENSIONS


def _trimmed(row: list[str]) -> list[str]:
    """``row`` without its trailing empty cells (a trailing delimiter is harmless)."""
    end = len(row)
    while end and not row[end - 1].strip():
        end -= 1
    return row[:end]


@contextlib.contextmanager
def _csv_field_limit(limit: int):
    """``csv.field_size_limit`` raised to at least ``limit`` (a C long) for the block, then restored."""
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, min(limit, 2**31 - 1)))
    try:
        yield
    finally:
        csv.field_size_limit(old)


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
                        str(shard), member.offset_data, member.size
                    )
        except (tarfile.TarError, OSError, EOFError) as err:  # a cut shard: keep what was listed
            skips.append(Skip(str(shard), f"unreadable tar ({type(err).__name__})"))
        shard_pairs, shard_skips = _group_pairs(items, f"{shard}:")
        pairs += shard_pairs
        skips += shard_skips
    return pairs, skips

"""The one decoder of image-text pairs: a blob's bytes, a caption's text, an image's RGB pixels.

The writer (``write_prepare``, in its workers), the torch fallback loader (``torch_loader``, in
its DataLoader workers) and eval's image-folder reader (``declip_fast.eval.zeroshot.load_image``)
all call these functions, so a pair is good or bad, and decodes to the same pixels, whichever of
them reads it. A problem with the input is a :class:`BadSample` whose message is the reason the
writer's summary and the loader's log count it under; callers turn it into a skip and never stop
for it.

- Bytes (:func:`read_bytes`): a path, or a ``sources.Blob`` (``size`` bytes at ``offset``: a tar
  member). Reasons ``missing {what}``, ``unreadable {what}``, ``truncated {what}`` (a tar member
  cut short) and ``{what} too long`` (past the caller's limit: a caption is read up to
  ``CAPTION_MAX_BYTES``, so a huge one is never read whole).
- Captions (:func:`caption_text`): a str, bytes, or a blob to read. The text must be UTF-8:
  undecodable bytes, or a str holding lone surrogates (the bytes a table read with
  ``surrogateescape`` could not decode), are ``caption not utf-8``, a bad sample, never text with
  replacement characters. A leading BOM and surrounding whitespace are dropped; then ``empty
  caption``, or ``caption too long`` past ``schema.MAX_CAPTION_CHARS`` characters.
- Images (:func:`decode_image`, :func:`load_pixels`): decoded by content with Pillow (the
  extension is never trusted); EXIF orientation applied (a broken EXIF block keeps the pixels as
  stored); alpha, or a palette's transparent colour, composited on white; RGB uint8 [H, W, 3]. A
  JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling: several times faster on large
  images) when the result still has a longest side of ``min_longest_side`` (the writer: the side
  it stores) and a geometric-mean side sqrt(H * W) of ``min_mean_side`` (the fallback loader: its
  smallest random crop then still covers its output size); with neither, it is decoded whole
  (eval). Reasons ``missing image``, ``empty image file``, ``not an image``, ``truncated image``,
  ``corrupt image``, ``image too large`` (Pillow's decompression-bomb limit), ``empty image``.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np

from declip_fast.data.schema import MAX_CAPTION_CHARS

# A caption is read up to this many bytes: more cannot decode to MAX_CAPTION_CHARS characters of
# text plus surrounding whitespace worth keeping.
CAPTION_MAX_BYTES = 4 * MAX_CAPTION_CHARS + 4096
# How image files start: bytes Pillow cannot identify but that start so are a cut image.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


class BadSample(Exception):
    """A sample that cannot be read; the message is the reason it is skipped and counted under."""


def read_bytes(blob, what: str, limit: int | None = None) -> bytes:
    """The bytes of ``blob`` (a path, or ``(path, offset, size)``: a ``sources.Blob``); with
    ``limit``, more than ``limit`` of them is ``{what} too long``."""
    path, offset, size = (blob, 0, None) if isinstance(blob, (str, os.PathLike)) else tuple(blob)
    want = size if limit is None else (limit + 1 if size is None else min(size, limit + 1))
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read() if want is None else f.read(want)
    except FileNotFoundError:
        raise BadSample(f"missing {what}") from None
    except OSError:
        raise BadSample(f"unreadable {what}") from None
    if limit is not None and len(data) > limit:
        raise BadSample(f"{what} too long")
    if size is not None and len(data) < size:  # a tar member cut short
        raise BadSample(f"truncated {what}")
    return data


def caption_text(raw) -> str:
    """The caption's text: ``raw`` a str, UTF-8 bytes, or a path / blob of them."""
    if raw is None:
        raise BadSample("missing caption")
    if not isinstance(raw, (str, bytes)):  # a Blob: the .txt file or tar member
        raw = read_bytes(raw, "caption", CAPTION_MAX_BYTES)
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadSample("caption not utf-8") from None
    try:
        raw.encode("utf-8")  # lone surrogates: bytes a table could not decode
    except UnicodeEncodeError:
        raise BadSample("caption not utf-8") from None
    text = raw.lstrip("\ufeff").strip()
    if not text:
        raise BadSample("empty caption")
    if len(text) > MAX_CAPTION_CHARS:  # schema.MAX_CAPTION_CHARS says why
        raise BadSample("caption too long")
    return text


def rgb_array(pixels: np.ndarray) -> np.ndarray:
    """An in-memory image (HxW gray or HxWx3) as contiguous RGB uint8 [H, W, 3]."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    return np.repeat(pixels[:, :, None], 3, axis=2) if pixels.ndim == 2 else pixels


def load_pixels(image, min_longest_side: int = 0, min_mean_side: int = 0) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a pair's image: an array (:func:`rgb_array`), or a path / blob of
    encoded bytes (:func:`decode_image`, which says what the two sides mean)."""
    if image is None:
        raise BadSample("missing image")
    if isinstance(image, np.ndarray):
        return rgb_array(image)
    return decode_image(read_bytes(image, "image"), min_longest_side, min_mean_side)


def decode_image(data: bytes, min_longest_side: int = 0, min_mean_side: int = 0) -> np.ndarray:
    """RGB uint8 [H, W, 3] (a writable array) from encoded image bytes (JPEG, PNG, ...): see the
    module docstring. A JPEG is decoded at the smallest DCT scale (1, 1/2, 1/4, 1/8) whose result
    keeps a longest side >= ``min_longest_side`` and sqrt(H * W) >= ``min_mean_side`` (0: no
    bound; both 0: decoded whole). (Not ``torchvision.io.decode_image``: deprecated since
    torchvision 0.29.)"""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise BadSample("empty image file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            draft = _draft_size(im.size, min_longest_side, min_mean_side)
            if draft is not None:  # only JPEG decoders act on it
                im.draft("RGB", draft)
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # a broken EXIF block: keep the pixels as stored
                pass
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                im = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
            pixels = np.array(im if im.mode == "RGB" else im.convert("RGB"))  # a writable copy
    except UnidentifiedImageError:
        raise BadSample("truncated image" if data.startswith(_IMAGE_MAGIC) else "not an image") from None
    except Image.DecompressionBombError:
        raise BadSample("image too large") from None
    except Exception as err:  # any decoder complaint about the bytes
        raise BadSample("truncated image" if "runcated" in str(err) else "corrupt image") from None
    if pixels.ndim != 3 or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise BadSample("empty image")
    return pixels


def _draft_size(size: tuple[int, int], min_longest_side: int, min_mean_side: int) -> tuple[int, int] | None:
    """The size to ask ``Image.draft`` for (it picks the smallest DCT scale at least that big),
    or None to decode whole."""
    width, height = size
    wanted = []
    if min_longest_side > 0:  # the longest side stays >= min_longest_side
        ratio = min_longest_side / max(width, height)
        if ratio < 1:
            wanted.append((math.ceil(width * ratio), math.ceil(height * ratio)))
    if min_mean_side > 0:  # sqrt(area) stays >= min_mean_side
        factor = max(1, int(math.sqrt(width * height) / min_mean_side))
        if factor > 1:
            wanted.append((-(-width // factor), -(-height // factor)))
    if not wanted:
        return None
    return max(w for w, _ in wanted), max(h for _, h in wanted)

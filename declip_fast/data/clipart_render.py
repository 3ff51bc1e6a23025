"""The clip-art data set's image side: SVG -> ``rsvg-convert`` -> margins cropped -> square RGB.

Used by :mod:`declip_fast.data.clipart`. An SVG is rendered by Debian's ``rsvg-convert``
(``librsvg2-bin``) to a PNG of ``RENDER_SIZE`` (128) px on its longer side (aspect kept, language
fixed to English, so ``systemLanguage`` switches pick the same branch everywhere), composited on
white, cropped to the bounding box of its ink (pixels with a channel below ``INK_LEVEL``: alpha
and near-white page backgrounds both count as margin; many drawings sit small on a large page;
one whose ink spans fewer than ``image_size`` pixels is rendered again, larger), padded with
white to a centred square with a ``MARGIN`` border and resized to ``image_size`` (Lanczos). The
same SVG gives the same pixels with the same librsvg, fonts and Pillow.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import subprocess

import numpy as np

RENDER_SIZE = 128
INK_LEVEL = 245  # a pixel with any channel below this (on white) is part of the drawing
MARGIN = 0.04  # white border kept around the cropped drawing, as a fraction of its longer side
MIN_INK_SIDE = 3  # a drawing whose ink box is smaller than this (in render pixels) is blank
MAX_RENDER_SIZE = 1024  # the second pass of a small drawing renders its page at most this large
TIMEOUT_S = 60  # per file; none of the package's files comes near it
PACKAGES = "openclipart-svg librsvg2-bin"


class RenderError(Exception):
    """This file cannot be rendered; the message is the skip reason."""


def rsvg_convert() -> str:
    """The path of ``rsvg-convert``; ``FileNotFoundError`` (one line, naming the packages) without it."""
    path = shutil.which("rsvg-convert")
    if path is None:
        raise FileNotFoundError(
            f"rsvg-convert not found: install Debian's {PACKAGES} (apt-get install {PACKAGES}; scripts/setup.sh does)"
        )
    return path


def render_svg(path: str, rsvg: str, render_size: int = RENDER_SIZE) -> np.ndarray:
    """RGB uint8 [H, W, 3] of the SVG at ``path``, longer side ``render_size``, composited on white."""
    from PIL import Image

    command = [rsvg, "--keep-aspect-ratio", "-w", str(render_size), "-h", str(render_size), "-l", "en", "-f", "png"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "HOME": os.environ.get("HOME", "/")}
    try:
        done = subprocess.run([*command, path], capture_output=True, timeout=TIMEOUT_S, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise RenderError("render timed out") from None
    if done.returncode != 0 or not done.stdout:
        raise RenderError("render failed")
    try:
        with Image.open(io.BytesIO(done.stdout)) as image:
            rgba = image.convert("RGBA")
    except Exception:
        raise RenderError("render failed") from None
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))


def ink_box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the drawing in ``pixels`` (RGB on white); ``RenderError`` if blank."""
    ink = (pixels < INK_LEVEL).any(axis=2)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if len(rows) == 0 or max(rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]) < MIN_INK_SIDE:
        raise RenderError("blank render")
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def crop_square(pixels: np.ndarray, image_size: int, margin: float = MARGIN) -> np.ndarray:
    """The ink of ``pixels`` (RGB on white) cropped, centred on a white square, resized to ``image_size``."""
    from PIL import Image

    top, bottom, left, right = ink_box(pixels)
    height, width = bottom - top, right - left
    side = max(height, width) + 2 * int(round(margin * max(height, width)))
    square = np.full((side, side, 3), 255, np.uint8)
    y, x = (side - height) // 2, (side - width) // 2
    square[y : y + height, x : x + width] = pixels[top:bottom, left:right]
    resized = Image.fromarray(square).resize((image_size, image_size), Image.Resampling.LANCZOS, reducing_gap=None)
    return np.asarray(resized, dtype=np.uint8)


def render_square(path: str, rsvg: str, render_size: int, image_size: int) -> np.ndarray:
    """The ``image_size`` square of an SVG. A drawing whose ink spans fewer than ``image_size``
    pixels of the first render (small on a large page) is rendered again, larger (at most
    ``MAX_RENDER_SIZE``), so that it is shrunk to the square, not blown up."""
    pixels = render_svg(path, rsvg, render_size)
    top, bottom, left, right = ink_box(pixels)
    ink = max(bottom - top, right - left)
    if ink < image_size and render_size < MAX_RENDER_SIZE:
        larger = min(MAX_RENDER_SIZE, math.ceil(render_size * 2 * image_size / ink))
        pixels = render_svg(path, rsvg, larger)
    return crop_square(pixels, image_size)


def render_item(job: tuple[str, str, int, int]) -> np.ndarray | str:
    """(path, rsvg, render_size, image_size) -> the square image, or a skip reason (never raises)."""
    path, rsvg, render_size, image_size = job
    try:
        return render_square(path, rsvg, render_size, image_size)
    except RenderError as err:
        return str(err)
    except Exception as err:  # unforeseen: counted and named, never the end of the build
        return f"render failed ({type(err).__name__})"


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG of an RGB array with fixed settings (no metadata, zlib level 9): the same bytes every time."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=9, optimize=False)
    return buffer.getvalue()

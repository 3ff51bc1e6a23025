"""What a ``.beton`` holds and what counts as an image-text pair: the constants every data module
shares, defined here once (the writer, both loaders, the sources and eval import them).

Field layout (``FIELDS``; the loaders rely on it, in this order):

- ``image``: ``RGBImageField(write_mode="jpg", max_resolution=max_side, jpeg_quality=90)``: the
  image as RGB, longest side shrunk to ``max_side`` (default 384) with FFCV's size rule
  (``write_prepare._fit``), stored as a JPEG made by FFCV's own ``encode_jpeg``;
- ``tokens``: ``NDArrayField(int32, (CONTEXT_LENGTH,))``: the caption, CLIP-tokenized
  (``tokenizer.tokenize``, 77 ids);
- ``eda_tokens``: ``NDArrayField(int32, (EDA_VARIANTS, CONTEXT_LENGTH))``: EDA_VARIANTS = 4 EDA
  variants of the caption, tokenized (``write_prepare.eda_variants``); the loader picks one row per
  sample per epoch, so training never tokenizes or runs EDA;
- ``index``: ``IntField``: the sample's row number in the written file (coverage tests).

Pairs: an image is a file with one of ``IMAGE_EXTENSIONS`` when a source is listed (its content
decides how it decodes: :mod:`declip_fast.data.decode`); a caption longer than
``MAX_CAPTION_CHARS`` characters is a bad sample, from any source, for the writer and the fallback
loader alike.
"""

from __future__ import annotations

import numpy as np

CONTEXT_LENGTH = 77  # CLIP's text context: token ids per caption
EDA_VARIANTS = 4  # EDA views stored per caption
FIELDS = {  # field name -> (kind, dtype, shape); the order is the file's field order
    "image": ("RGBImageField", "uint8", None),
    "tokens": ("NDArrayField", "int32", (CONTEXT_LENGTH,)),
    "eda_tokens": ("NDArrayField", "int32", (EDA_VARIANTS, CONTEXT_LENGTH)),
    "index": ("IntField", "int64", ()),
}
# What a source's image files end with (case-insensitive); an ImageFolder for eval too. Listing
# trusts the extension, decoding never does.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
# Longer captions are skipped ("caption too long"): CLIP reads 77 tokens (a few hundred characters),
# so text this long is a page dump or rows merged by a broken quote, and EDA's cost grows with it.
MAX_CAPTION_CHARS = 16_384


def ffcv_fields(max_side: int = 384, jpeg_quality: int = 90) -> dict:
    """The FFCV field objects of ``FIELDS`` (ffcv is imported here, not at module import)."""
    from ffcv.fields import IntField, NDArrayField, RGBImageField

    return {
        "image": RGBImageField(write_mode="jpg", max_resolution=max_side, jpeg_quality=jpeg_quality),
        "tokens": NDArrayField(np.dtype("int32"), (CONTEXT_LENGTH,)),
        "eda_tokens": NDArrayField(np.dtype("int32"), (EDA_VARIANTS, CONTEXT_LENGTH)),
        "index": IntField(),
    }

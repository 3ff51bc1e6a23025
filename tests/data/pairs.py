"""The small pair set the loader tests share: 64 JPEGs of 40-63 px with several-word captions,
as a CSV for the torch fallback and a ``.beton`` (written here with FFCV's DatasetWriter, with four
real EDA variants per caption) for FFCV. The ``data`` fixture (tests/conftest.py) builds it once
per module."""

import csv
import random

import numpy as np
import torch

from declip_fast.data.tokenizer import tokenize

N = 64
CAPTION_WORDS = ["red car", "small dog", "old church", "green bicycle", "happy child", "tall building"]


def captions():
    return [f"a photo of a {CAPTION_WORDS[i % 6]} near the quiet river number {i}" for i in range(N)]


def _eda_variants(caption: str, i: int) -> list[str]:
    from declip_fast.data.eda import eda

    rng = random.Random(1000 + i)
    return [eda(caption, rng) for _ in range(4)]


def write_beton(path, images, captions):
    """The .beton layout of declip_fast.data.write: image, tokens, eda_tokens [4, 77], index."""
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    tokens = tokenize(captions).numpy().astype(np.int32)
    eda_tokens = np.stack([tokenize(_eda_variants(c, i)).numpy().astype(np.int32) for i, c in enumerate(captions)])

    class Rows:
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i], tokens[i], eda_tokens[i], i

    fields = {
        "image": RGBImageField(write_mode="jpg"),
        "tokens": NDArrayField(np.dtype("int32"), (77,)),
        "eda_tokens": NDArrayField(np.dtype("int32"), (4, 77)),
        "index": IntField(),
    }
    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(Rows())
    return eda_tokens


def build_pairs(root):
    """Write the pair set under ``root``; returns paths, captions and their tokens."""
    from PIL import Image

    rng = np.random.default_rng(0)
    captions_, images = captions(), []
    for i in range(N):
        h, w = rng.integers(40, 64, size=2)
        base = rng.integers(0, 256, size=(1, 1, 3))  # a colour per image, plus noise: never gray
        pixels = np.clip(base + rng.normal(0, 60, size=(h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.jpg", quality=90)
        images.append(np.asarray(Image.open(root / f"{i}.jpg").convert("RGB")))
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows([(f"{i}.jpg", c) for i, c in enumerate(captions_)])
    eda_tokens = write_beton(root / "data.beton", images, captions_)
    return {
        "root": root,
        "beton": str(root / "data.beton"),
        "csv": str(root / "pairs.csv"),
        "captions": captions_,
        "tokens": tokenize(captions_),
        "eda_tokens": torch.from_numpy(eda_tokens).long(),
    }

"""The demo data set: real Fashion-MNIST images with template captions, as train/test ``.beton`` files.

Source: Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``, gzipped IDX files;
``DECLIP_FAST_FASHION_MNIST`` overrides the folder): 60k train and 10k test 28x28 grayscale images of
10 clothing classes. ``ensure_demo_data`` writes into one folder:

- ``train.beton`` / ``test.beton``: the layout of ``write.FIELDS``. Images are the 28x28 originals,
  converted to RGB and upscaled (bicubic) to ``image_size`` = 64 px, so a RandomResizedCrop at scale
  0.2 still keeps about a 28 px window of real content and demo models at 32-64 px input never
  upsample at load time; 64 px JPEGs cost ~1.5 kB each. Captions are the class name put into one of
  ``CAPTION_TEMPLATES`` (16 phrasings), chosen per sample by a seeded generator. Subsets
  (``train_size``/``test_size``) are seeded random draws without replacement, kept in file order.
- ``train_labels.npy`` / ``test_labels.npy``: int64 class ids, row ``i`` belongs to the sample whose
  ``index`` field is ``i``;
- ``classes.json``: class names, zero-shot prompt templates and the prompts already written out per
  class (articles fixed), plus the build parameters. It is written last, so its presence with
  matching parameters means the folder is complete; anything else is rebuilt.

A file lock on the folder makes concurrent callers (several ranks of one job) build it once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import json
import os
import re
from pathlib import Path

import numpy as np

from declip_fast.atomic import atomic_write

from .sources import Pair
from .write import WriteConfig, write_pairs

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = (
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)  # Fashion-MNIST label order
CAPTION_TEMPLATES = (
    "a photo of a {}.",
    "a black and white picture of the {}.",
    "a grayscale photo of a {}.",
    "a low resolution photo of a {}.",
    "a small image of a {}.",
    "a product photo of a {}.",
    "a {} on a dark background.",
    "a close-up photo of the {}.",
    "a fashion item: a {}.",
    "a centered photo of a {}.",
    "a blurry picture of a {}.",
    "a catalogue picture of a {}.",
    "this is a {}.",
    "a picture showing a {}.",
    "a monochrome image of a {}.",
    "a tiny {} in a square frame.",
)
ZEROSHOT_TEMPLATES = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the {}.",
    "a grayscale image of a {}.",
    "a product photo of a {}.",
)
SPLITS = {"train": ("train", 60_000), "test": ("t10k", 10_000)}  # split -> (file prefix, size)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FORMAT = 1  # bump when the written files change meaning


@dataclasses.dataclass(frozen=True)
class DemoData:
    train: Path
    test: Path
    classes: Path
    train_labels: Path
    test_labels: Path
    summaries: dict = dataclasses.field(default_factory=dict, compare=False)  # split -> WriteSummary, if built


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (MNIST's format, gzipped or not) as a native-endian array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    ndim, dtype = data[3], np.dtype(_IDX_DTYPES[data[2]])
    shape = tuple(int(n) for n in np.frombuffer(data, ">u4", count=ndim, offset=4))
    array = np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=4 + 4 * ndim)
    return array.reshape(shape).astype(dtype.newbyteorder("="))


def _idx_path(folder: Path, name: str) -> Path:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{name}(.gz) not found in {folder}: install Debian's dataset-fashion-mnist "
        "(apt-get install dataset-fashion-mnist) or point DECLIP_FAST_FASHION_MNIST at the IDX files"
    )


def load_fashion_mnist(split: str, folder: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of ``split`` ("train" or "test")."""
    root = Path(folder or os.environ.get("DECLIP_FAST_FASHION_MNIST", FASHION_MNIST_DIR))
    prefix, _ = SPLITS[split]
    images = read_idx(_idx_path(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_path(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"unexpected Fashion-MNIST {split} shapes {images.shape}, {labels.shape}")
    return images, labels


def with_articles(text: str) -> str:
    """ "a" -> "an" before a vowel ("a ankle boot" -> "an ankle boot")."""
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)


def captions(labels: np.ndarray, rng: np.random.Generator) -> list[str]:
    """One caption per label, each from a template drawn by ``rng``."""
    choice = rng.integers(len(CAPTION_TEMPLATES), size=len(labels))
    return [with_articles(CAPTION_TEMPLATES[t].format(CLASSES[y])) for t, y in zip(choice, labels)]


def subset(split: str, size: int, seed: int = 0, folder=None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images, labels, captions) of the demo subset: what ensure_demo_data writes, row for row."""
    images, labels = load_fashion_mnist(split, folder)
    if not 1 <= size <= len(images):
        raise ValueError(f"{split} size must be in 1..{len(images)}, got {size}")
    rng = np.random.default_rng([seed, list(SPLITS).index(split)])
    keep = np.sort(rng.choice(len(images), size, replace=False))
    return images[keep], labels[keep], captions(labels[keep], rng)


@contextlib.contextmanager
def _folder_lock(folder: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no concurrent builders expected
        yield
        return
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_demo_data(
    out_dir: str | os.PathLike,
    train_size: int = 10_000,
    test_size: int = 2_000,
    image_size: int = 64,
    seed: int = 0,
    workers: int = 0,
    progress: bool = False,
    rebuild: bool = False,
    source_dir: str | os.PathLike | None = None,
    any_build: bool = False,
) -> DemoData:
    """The demo files in ``out_dir``, built first when missing or built with other parameters
    (``any_build``: a complete folder is used whatever it was built with, e.g. a small one a
    test made; only a missing or incomplete one is built, with these parameters)."""
    out = Path(out_dir)
    paths = DemoData(
        out / "train.beton", out / "test.beton", out / "classes.json", out / "train_labels.npy", out / "test_labels.npy"
    )
    build = {
        "format": _FORMAT,
        "train_size": train_size,
        "test_size": test_size,
        "image_size": image_size,
        "seed": seed,
    }
    out.mkdir(parents=True, exist_ok=True)
    with _folder_lock(out):
        if not rebuild and _is_complete(paths, None if any_build else build):
            return paths
        paths.classes.unlink(missing_ok=True)  # the folder is incomplete until it is rewritten
        config = WriteConfig(
            max_side=image_size, upscale=True, seed=seed, workers=workers, overwrite=True, progress=progress
        )
        for split, size in (("train", train_size), ("test", test_size)):
            images, labels, texts = subset(split, size, seed, source_dir)
            pairs = [
                Pair(f"fashion-mnist {split}[{i}]", image, text) for i, (image, text) in enumerate(zip(images, texts))
            ]
            summary = paths.summaries[split] = write_pairs(pairs, getattr(paths, split), config)
            if summary.written != size:  # labels are row-aligned: every image must be written
                raise RuntimeError(f"demo {split}: wrote {summary.written} of {size} ({summary.by_reason()})")
            atomic_write(getattr(paths, f"{split}_labels"), functools.partial(_save_npy, array=labels))
        manifest = {
            "classes": list(CLASSES),
            "templates": list(ZEROSHOT_TEMPLATES),
            "prompts": {c: [with_articles(t.format(c)) for t in ZEROSHOT_TEMPLATES] for c in CLASSES},
            "caption_templates": list(CAPTION_TEMPLATES),
            "build": build,
        }
        atomic_write(paths.classes, lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))
    return paths


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
        np.save(f, array)


def _is_complete(paths: DemoData, build: dict | None) -> bool:
    """All files present, written by ``build`` (any complete build for None)."""
    if not all(Path(p).is_file() for p in dataclasses.astuple(paths)[:5]):
        return False
    try:
        written = json.loads(paths.classes.read_text()).get("build")
        return written == build or (build is None and written is not None)
    except (OSError, ValueError):
        return False

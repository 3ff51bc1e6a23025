"""Labelled images for evaluation: re-iterable batches of (float [B, 3, S, S] normalized with the
training statistics, int64 [B] labels) from a ``.beton`` plus labels or an ImageFolder-layout
folder (the formats are described in ``declip_fast.eval.zeroshot``; the linear probe reads them
too). FFCV and PIL are imported inside the functions that need them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from declip_fast.data.augment import IMAGENET_MEAN, IMAGENET_STD
from declip_fast.data.decode import BadSample, load_pixels
from declip_fast.data.schema import IMAGE_EXTENSIONS


def _normalize(images_uint8_nhwc: torch.Tensor) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> float32 [B, 3, S, S], /255 and ImageNet-normalized (a new tensor)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images = images_uint8_nhwc.permute(0, 3, 1, 2).float().div_(255)
    return images.sub_(mean).div_(std).contiguous()


class LabelledImages:
    """Re-iterable batches of (images float [B, 3, S, S], labels int64 [B]) in a fixed order.

    ``labels`` (np.int64 [N]) are in iteration order; ``classes`` are the class names where the
    source knows them (an image folder), else None. ``len()`` is the number of batches.
    """

    def __init__(
        self,
        path: Path,
        image_size: int,
        batch_size: int,
        labels: np.ndarray,
        classes: list[str] | None,
        num_workers: int,
    ):
        self.path, self.image_size, self.batch_size = path, image_size, batch_size
        self.labels, self.classes, self.num_workers = labels, classes, num_workers

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


class BetonImages(LabelledImages):
    """A ``.beton``'s ``image`` field through FFCV in file order; labels from a ``.npy``."""

    def __init__(self, *args, **kwargs):
        from ffcv.reader import Reader

        super().__init__(*args, **kwargs)
        fields = Reader(str(self.path)).handlers
        if "image" not in fields:
            raise ValueError(f"{self.path} has no 'image' field (fields: {sorted(fields)})")
        self._has_index = "index" in fields
        self._fields = list(fields)
        self._loader = None

    def _build(self):
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import ToTensor

        size = self.image_size
        pipelines = {name: None for name in self._fields}  # decode nothing else
        pipelines["image"] = [CenterCropRGBImageDecoder((size, size), ratio=1.0), ToTensor()]
        if self._has_index:
            pipelines["index"] = [IntDecoder(), ToTensor()]
        return Loader(
            str(self.path),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            order=OrderOption.SEQUENTIAL,
            pipelines=pipelines,
            drop_last=False,
        )

    def __iter__(self):
        if self._loader is None:
            self._loader = self._build()
        start = 0
        for out in self._loader:
            images = _normalize(out[0])  # a new tensor: FFCV reuses its buffers
            if self._has_index:  # row i of the labels belongs to the sample whose index is i
                rows = out[1].reshape(-1).numpy().astype(np.int64)
            else:
                rows = np.arange(start, start + len(images))
            start += len(images)
            yield images, torch.from_numpy(self.labels[rows])


class FolderImages(LabelledImages):
    """An ImageFolder-layout tree: PIL decode, shorter side -> S (bicubic), central S x S."""

    def __init__(
        self,
        path: Path,
        image_size: int,
        batch_size: int,
        files: list[Path],
        labels: np.ndarray,
        classes: list[str],
        num_workers: int,
    ):
        super().__init__(path, image_size, batch_size, labels, classes, num_workers)
        self.files = files

    def __iter__(self):
        dataset = _ImageFiles(self.files, self.image_size)
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers)
        labels = torch.from_numpy(self.labels)
        start = 0
        for images in loader:  # sequential: the batches follow self.files
            yield images, labels[start : start + len(images)]
            start += len(images)


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return _normalize(torch.from_numpy(load_image(self.files[i], self.size))[None])[0]


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: RGB (``decode.load_pixels``, whole), shorter side resized to ``size``
    (bicubic), central crop. An image that does not decode is a ``ValueError`` naming the path."""
    from PIL import Image

    try:
        image = Image.fromarray(load_pixels(path))
    except BadSample as bad:
        raise ValueError(f"cannot read image {path}: {bad}") from None
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.array(image.crop((left, top, left + size, top + size)), dtype=np.uint8)  # writable


def _read_labels(labels, beton: Path) -> np.ndarray:
    if isinstance(labels, np.ndarray | torch.Tensor | list | tuple):
        where, array = "the given labels", np.asarray(labels)
    else:
        path = Path(labels) if labels is not None else beton.with_name(f"{beton.stem}_labels.npy")
        if not path.is_file():
            raise FileNotFoundError(f"labels file {path} not found for {beton} (pass labels=... / --labels)")
        where, array = str(path), np.load(path, allow_pickle=False)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{where}: expected a 1-D integer array, got {array.dtype} {array.shape}")
    if len(array) and array.min() < 0:
        raise ValueError(f"{where}: negative labels")
    return array.astype(np.int64)


def _scan_folder(root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        files += found
        labels += [label] * len(found)
    if not files:
        raise ValueError(
            f"{root}: no images in class subfolders (ImageFolder layout: "
            f"{root}/<class>/<image>{'/'.join(IMAGE_EXTENSIONS[:3])})"
        )
    return files, np.asarray(labels, dtype=np.int64), classes


def labelled_images(
    path: str | os.PathLike, image_size: int, batch_size: int = 256, labels=None, num_workers: int | None = None
) -> LabelledImages:
    """Batches of labelled images from a ``.beton`` (+ labels ``.npy``; default: the sibling
    ``<stem>_labels.npy``) or an ImageFolder-layout folder (whose ``classes`` are then known)."""
    path = Path(path)
    if num_workers is None:
        num_workers = max(1, min(8, os.cpu_count() or 1))
    if path.is_dir():
        if labels is not None:
            raise ValueError(f"{path} is an image folder: its labels come from its subfolders")
        files, folder_labels, classes = _scan_folder(path)
        return FolderImages(path, image_size, batch_size, files, folder_labels, classes, num_workers)
    if path.suffix != ".beton":
        raise ValueError(f"{path}: expected a .beton file or an image folder (ImageFolder layout)")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    array = _read_labels(labels, path)
    images = BetonImages(path, image_size, batch_size, array, None, max(1, num_workers))
    num_samples = _beton_size(path)
    if len(array) != num_samples:
        raise ValueError(f"{path} holds {num_samples} images but its labels have {len(array)} rows")
    return images


def _beton_size(path: Path) -> int:
    from ffcv.reader import Reader

    return int(Reader(str(path)).num_samples)

"""Zero-shot classification: prompt-ensemble classifiers, labelled image readers, top-1 / top-5.

The protocol is CLIP's (Radford et al. 2021, section 3.1.4): for every class, each prompt (a
template filled with the class name, or an explicit list per class) is encoded by the text tower
and L2-normalized; the class's weight is the mean of those, normalized again. An image is
classified by the cosine similarity of its normalized image feature with every class weight.

Images come from :func:`labelled_images`, batches of (float [B, 3, S, S] normalized with the
training statistics, int64 [B] labels), read from either

- a ``.beton`` (the layout of ``declip_fast.data.write``) plus an int64 labels ``.npy`` whose row
  ``i`` belongs to the sample whose ``index`` field is ``i`` (the demo's ``test_labels.npy``).
  FFCV reads in file order; the crop is CLIP's evaluation crop, the central square of side
  ``min(h, w)`` resized to S (``CenterCropRGBImageDecoder`` with ``ratio`` = crop side / shorter
  side = 1.0); or
- a folder in ImageFolder layout (one subfolder per class, sorted names = class ids), decoded as
  the writer and the fallback loader decode (:mod:`declip_fast.data.decode`: by content, EXIF
  orientation applied, alpha on white), at full resolution; then shorter side resized to S
  (PIL's bicubic), then the central S x S.

Everything heavy (FFCV, PIL) is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from declip_fast.data.augment import IMAGENET_MEAN, IMAGENET_STD
from declip_fast.data.decode import BadSample, load_pixels
from declip_fast.data.schema import IMAGE_EXTENSIONS

# CLIP's 80 ImageNet prompt templates (the "Prompt_Engineering_for_ImageNet" notebook of
# openai/CLIP), in the notebook's order. Data, not code.
CLIP_IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.",
    "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.",
    "art of a {}.", "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.",
    "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.",
    "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)

Prompts = Sequence[str] | Mapping[str, Sequence[str]]  # templates with "{}", or class -> prompts


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """``model.eval()`` inside, its previous mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def class_prompts(classnames: Sequence[str], templates_or_prompts: Prompts) -> list[list[str]]:
    """The prompts of every class: templates formatted with the class name, or looked up."""
    if isinstance(templates_or_prompts, Mapping):
        missing = [c for c in classnames if not templates_or_prompts.get(c)]
        if missing:
            raise ValueError(f"no prompts for class(es) {missing[:5]}")
        return [list(templates_or_prompts[c]) for c in classnames]
    if isinstance(templates_or_prompts, str) or not templates_or_prompts:
        raise ValueError("templates must be a non-empty sequence of format strings with '{}'")
    return [[t.format(c) for t in templates_or_prompts] for c in classnames]


@torch.no_grad()
def classifier_weights(model: torch.nn.Module, classnames: Sequence[str], templates_or_prompts: Prompts,
                       device: torch.device | str, batch_size: int = 256) -> torch.Tensor:
    """CLIP's prompt-ensemble zero-shot classifier: float32 [E, C] on ``device``, unit columns."""
    from declip_fast.data.tokenizer import tokenize

    per_class = class_prompts(classnames, templates_or_prompts)
    flat = [p for prompts in per_class for p in prompts]
    owner = torch.tensor([c for c, prompts in enumerate(per_class) for _ in prompts], device=device)
    context = getattr(getattr(getattr(model, "config", None), "text", None), "context_length", 77)
    features = []
    with eval_mode(model):
        for start in range(0, len(flat), batch_size):
            tokens = tokenize(flat[start:start + batch_size], context_length=context).to(device)
            features.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    features = torch.cat(features)
    sums = features.new_zeros(len(per_class), features.shape[1]).index_add_(0, owner, features)
    counts = torch.bincount(owner, minlength=len(per_class)).to(sums.dtype)
    return F.normalize(sums / counts[:, None], dim=-1).T.contiguous()


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, weights: torch.Tensor, device: torch.device | str) -> dict:
    """Top-1 / top-5 accuracy (fractions; top-5 uses k = min(5, C)) and sample count ``n``."""
    num_classes = weights.shape[1]
    k = min(5, num_classes)
    weights = weights.to(device, torch.float32)
    correct_1 = correct_k = n = 0
    with eval_mode(model):
        dtype = model_dtype(model)
        for images, labels in batches:
            features = model.encode_image(images.to(device, dtype), normalize=True).float()
            labels = labels.to(device)
            if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(f"labels outside 0..{num_classes - 1} for a {num_classes}-class classifier")
            topk = (features @ weights).topk(k, dim=1).indices
            hits = topk == labels[:, None]
            correct_1 += int(hits[:, 0].sum())
            correct_k += int(hits.any(dim=1).sum())
            n += len(labels)
    if n == 0:
        raise ValueError("no images to evaluate")
    return {"top1": correct_1 / n, "top5": correct_k / n, "n": n}


# -- labelled image readers ----------------------------------------------------------------------


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

    def __init__(self, path: Path, image_size: int, batch_size: int, labels: np.ndarray,
                 classes: list[str] | None, num_workers: int):
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
        return Loader(str(self.path), batch_size=self.batch_size, num_workers=self.num_workers,
                      order=OrderOption.SEQUENTIAL, pipelines=pipelines, drop_last=False)

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

    def __init__(self, path: Path, image_size: int, batch_size: int, files: list[Path],
                 labels: np.ndarray, classes: list[str], num_workers: int):
        super().__init__(path, image_size, batch_size, labels, classes, num_workers)
        self.files = files

    def __iter__(self):
        dataset = _ImageFiles(self.files, self.image_size)
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers)
        labels = torch.from_numpy(self.labels)
        start = 0
        for images in loader:  # sequential: the batches follow self.files
            yield images, labels[start:start + len(images)]
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
        found = sorted(p for p in (root / name).rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        files += found
        labels += [label] * len(found)
    if not files:
        raise ValueError(f"{root}: no images in class subfolders (ImageFolder layout: "
                         f"{root}/<class>/<image>{'/'.join(IMAGE_EXTENSIONS[:3])})")
    return files, np.asarray(labels, dtype=np.int64), classes


def labelled_images(path: str | os.PathLike, image_size: int, batch_size: int = 256, labels=None,
                    num_workers: int | None = None) -> LabelledImages:
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


# -- class names and prompts ---------------------------------------------------------------------


def read_classes(path: str | os.PathLike) -> tuple[list[str] | None, Prompts | None]:
    """(class names, prompts or templates) from a classes JSON (the demo's ``classes.json``):
    ``{"classes": [...], "prompts": {class: [...]}}`` or ``{"classes": [...], "templates": [...]}``;
    a plain list is the class names alone. Missing parts are None."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read classes JSON {path}: {err}") from err
    if isinstance(data, list):
        data = {"classes": data}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object or list")
    classes = data.get("classes")
    prompts = data.get("prompts") or data.get("templates")
    return (list(classes) if classes else None), prompts


def class_names_and_prompts(images: LabelledImages, classes=None) -> tuple[list[str], Prompts]:
    """Class names and prompts for ``images``: from the classes JSON ``classes`` (default: a
    ``classes.json`` beside a ``.beton``), names falling back to an image folder's subfolders and
    prompts to :data:`CLIP_IMAGENET_TEMPLATES`."""
    if classes is None and images.path.suffix == ".beton" and (images.path.parent / "classes.json").is_file():
        classes = images.path.parent / "classes.json"
    names, prompts = read_classes(classes) if classes is not None else (None, None)
    if names is None:
        names = images.classes
    if names is None:
        raise ValueError(f"{images.path}: no class names; pass a classes JSON (--classes)")
    if images.classes is not None and len(names) != len(images.classes):
        raise ValueError(f"{classes} names {len(names)} classes, {images.path} has {len(images.classes)}")
    return names, prompts or CLIP_IMAGENET_TEMPLATES


def zeroshot_eval(model: torch.nn.Module, data: str | os.PathLike, classes: str | os.PathLike | None,
                  device: torch.device | str, image_size: int, batch_size: int = 256, labels=None,
                  num_workers: int | None = None) -> dict:
    """Zero-shot top-1 / top-5 on a labelled ``.beton`` or image folder (see :func:`labelled_images`),
    with class names and prompts from :func:`class_names_and_prompts`."""
    images = labelled_images(data, image_size, batch_size, labels=labels, num_workers=num_workers)
    names, prompts = class_names_and_prompts(images, classes)
    weights = classifier_weights(model, names, prompts, device)
    return evaluate(model, images, weights, device)


def zeroshot_demo(model: torch.nn.Module, demo_dir: str | os.PathLike, device: torch.device | str,
                  image_size: int, batch_size: int = 256, num_workers: int | None = None) -> dict:
    """Zero-shot top-1 / top-5 on the demo's test split (``test.beton``, ``test_labels.npy`` and
    the per-class prompts of ``classes.json``), as built by ``ensure_demo_data``."""
    demo_dir = Path(demo_dir)
    if not (demo_dir / "classes.json").is_file():
        raise FileNotFoundError(f"{demo_dir}/classes.json not found: build the demo data first "
                                f"(declip-fast write-dataset --demo {demo_dir})")
    return zeroshot_eval(model, demo_dir / "test.beton", demo_dir / "classes.json", device, image_size,
                         batch_size, labels=demo_dir / "test_labels.npy", num_workers=num_workers)

"""Zero-shot classification: prompt-ensemble classifiers, labelled image readers, top-1 / top-5.

The protocol is CLIP's (Radford et al. 2021, section 3.1.4): for every class, each prompt (a
template filled with the class name, or an explicit list per class) is encoded by the text tower
and L2-normalized; the class's weight is the mean of those, normalized again. An image is
classified by the cosine similarity of its normalized image feature with every class weight.

Images come from :func:`labelled_images` (``declip_fast.eval.images``), batches of (float
[B, 3, S, S] normalized with the training statistics, int64 [B] labels), read from either

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
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

# The labelled image readers and CLIP's templates live in their own modules; re-exported here.
from declip_fast.eval.images import (  # noqa: F401
    BetonImages,
    FolderImages,
    LabelledImages,
    labelled_images,
    load_image,
)
from declip_fast.eval.templates import CLIP_IMAGENET_TEMPLATES

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
def classifier_weights(
    model: torch.nn.Module,
    classnames: Sequence[str],
    templates_or_prompts: Prompts,
    device: torch.device | str,
    batch_size: int = 256,
) -> torch.Tensor:
    """CLIP's prompt-ensemble zero-shot classifier: float32 [E, C] on ``device``, unit columns."""
    from declip_fast.data.tokenizer import tokenize

    per_class = class_prompts(classnames, templates_or_prompts)
    flat = [p for prompts in per_class for p in prompts]
    owner = torch.tensor([c for c, prompts in enumerate(per_class) for _ in prompts], device=device)
    context = getattr(getattr(getattr(model, "config", None), "text", None), "context_length", 77)
    features = []
    with eval_mode(model):
        for start in range(0, len(flat), batch_size):
            tokens = tokenize(flat[start : start + batch_size], context_length=context).to(device)
            features.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    features = torch.cat(features)
    sums = features.new_zeros(len(per_class), features.shape[1]).index_add_(0, owner, features)
    counts = torch.bincount(owner, minlength=len(per_class)).to(sums.dtype)
    return F.normalize(sums / counts[:, None], dim=-1).T.contiguous()


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, weights: torch.Tensor, device: torch.device | str) -> dict:
    """Top-1 / top-5 accuracy (fractions; top-5 uses k = min(5, C)), the balanced top-1 and the
    sample count ``n``. ``balanced_top1`` is the mean over the classes present in the labels of
    each class's top-1 recall (scikit-learn's ``balanced_accuracy_score``): on unbalanced classes
    it weighs every class alike, where ``top1`` weighs every image alike; the two agree when every
    class has as many images."""
    num_classes = weights.shape[1]
    k = min(5, num_classes)
    weights = weights.to(device, torch.float32)
    correct_1 = correct_k = n = 0
    seen = torch.zeros(num_classes, dtype=torch.long, device=device)  # images per class
    right = torch.zeros_like(seen)  # top-1 hits per class
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
            seen += torch.bincount(labels, minlength=num_classes)
            right += torch.bincount(labels[hits[:, 0]], minlength=num_classes)
            n += len(labels)
    if n == 0:
        raise ValueError("no images to evaluate")
    present = seen > 0
    balanced = float((right[present].double() / seen[present]).mean())
    return {"top1": correct_1 / n, "balanced_top1": balanced, "top5": correct_k / n, "n": n}


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


def zeroshot_eval(
    model: torch.nn.Module,
    data: str | os.PathLike,
    classes: str | os.PathLike | None,
    device: torch.device | str,
    image_size: int,
    batch_size: int = 256,
    labels=None,
    num_workers: int | None = None,
) -> dict:
    """Zero-shot top-1 / top-5 on a labelled ``.beton`` or image folder (see :func:`labelled_images`),
    with class names and prompts from :func:`class_names_and_prompts`."""
    images = labelled_images(data, image_size, batch_size, labels=labels, num_workers=num_workers)
    names, prompts = class_names_and_prompts(images, classes)
    weights = classifier_weights(model, names, prompts, device)
    return evaluate(model, images, weights, device)


def zeroshot_demo(
    model: torch.nn.Module,
    demo_dir: str | os.PathLike,
    device: torch.device | str,
    image_size: int,
    batch_size: int = 256,
    num_workers: int | None = None,
) -> dict:
    """Zero-shot top-1 / top-5 on the demo's test split (``test.beton``, ``test_labels.npy`` and
    the per-class prompts of ``classes.json``), as built by ``ensure_demo_data``."""
    demo_dir = Path(demo_dir)
    if not (demo_dir / "classes.json").is_file():
        raise FileNotFoundError(
            f"{demo_dir}/classes.json not found: build the demo data first "
            f"(declip-fast write-dataset --demo {demo_dir})"
        )
    return zeroshot_eval(
        model,
        demo_dir / "test.beton",
        demo_dir / "classes.json",
        device,
        image_size,
        batch_size,
        labels=demo_dir / "test_labels.npy",
        num_workers=num_workers,
    )

"""Image-text retrieval on held-out pairs: recall@K in both directions (the CLIP / ALIGN / COCO protocol).

Scores are dot products of L2-normalised embeddings (cosine similarities), computed in float32
(embeddings of a lower precision are upcast). ``text_to_image[t]`` is the image caption ``t``
belongs to; an image may have several captions (COCO has five), and every image needs one.

- image -> text R@K: the fraction of images for which at least one of their captions is among the
  K highest-scoring captions;
- text -> image R@K: the fraction of captions whose own image is among the K highest-scoring images.

Ties count against the model (pessimistic). An image's rank is the number of *other* images'
captions that score at least as high as its best caption; a caption's rank is the number of
other images that score at least as high as its own; a hit at K is rank < K. Continuous scores
almost never tie, so this agrees with any sort; it matters for degenerate embeddings: a collapsed
model (every embedding equal) scores 0, where counting only strictly higher scores would give it 1.
The similarity matrix is computed ``chunk_size`` rows at a time, so N x N scores are never held whole.

Held-out pairs (:func:`read_pairs`) are listed by ``declip_fast.data.sources.list_pairs``, the
training writer's lister, so its sources work here:

- a CSV/TSV of (image, caption) rows, header optional, image paths relative to the table's
  folder or absolute. Rows naming the same image file are captions of one image;
- a folder of images, each with a same-named ``.txt``; each non-blank line of a ``.txt`` is one
  caption of its image (training reads the whole file as one caption);
- webdataset tar shards (``key.jpg`` + ``key.txt``), their ``.txt`` read as a folder's.

Captions are checked by ``declip_fast.data.decode.caption_text``. Images are decoded and cropped
as the zero-shot evaluation reads an image folder (``declip_fast.eval.images.load_image``: whole
decode, shorter side resized to S, bicubic, central S x S, the training normalisation). Training
skips bad samples; evaluation stops at the first one with a ``ValueError`` naming it, because a
metric over a silently smaller set cannot be compared with anyone else's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from declip_fast.eval.zeroshot import eval_mode, model_dtype

KS = (1, 5, 10)


@torch.no_grad()
def recall_at_k(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = KS,
    chunk_size: int = 1024,
) -> dict:
    """``{"i2t_R@K": ..., "t2i_R@K": ... for K in ks, "n_images": N_img, "n_texts": N_txt}`` from
    L2-normalised image embeddings [N_img, E], text embeddings [N_txt, E] and ``text_to_image``
    (int [N_txt], values in 0..N_img-1). Recalls are fractions; ties count against the model."""
    images, texts, owner = _checked(image_embeddings, text_embeddings, text_to_image)
    if chunk_size < 1 or not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"need chunk_size >= 1 and positive integer ks, got {chunk_size}, {list(ks)}")
    n_img, n_txt = len(images), len(texts)
    i2t_rank = torch.empty(n_img, dtype=torch.long, device=images.device)
    for start in range(0, n_img, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, n_img), device=images.device)
        scores = images[rows] @ texts.T  # [c, N_txt]
        own = owner[None, :] == rows[:, None]
        best = scores.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)  # best own caption
        i2t_rank[rows] = ((scores >= best) & ~own).sum(dim=1)
    t2i_rank = torch.empty(n_txt, dtype=torch.long, device=images.device)
    for start in range(0, n_txt, chunk_size):
        end = min(start + chunk_size, n_txt)
        scores = texts[start:end] @ images.T  # [c, N_img]
        own = scores.gather(1, owner[start:end, None])
        t2i_rank[start:end] = (scores >= own).sum(dim=1) - 1  # not counting the own image itself
    result = {}
    for name, rank in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in ks:
            result[f"{name}_R@{k}"] = int((rank < k).sum()) / len(rank)
    result.update(n_images=n_img, n_texts=n_txt)
    return result


def _checked(images: torch.Tensor, texts: torch.Tensor, owner: torch.Tensor):
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise ValueError(f"need [N_img, E] and [N_txt, E] embeddings, got {tuple(images.shape)}, {tuple(texts.shape)}")
    if owner.shape != (len(texts),) or owner.dtype.is_floating_point or owner.dtype == torch.bool:
        raise ValueError(f"text_to_image must be integer [{len(texts)}], got {owner.dtype} {tuple(owner.shape)}")
    if len(images) == 0 or len(texts) == 0:
        raise ValueError("no images or no captions to evaluate")
    owner = owner.to(images.device, torch.long)
    if owner.min() < 0 or owner.max() >= len(images):
        raise ValueError(f"text_to_image values outside 0..{len(images) - 1}")
    captionless = int((torch.bincount(owner, minlength=len(images)) == 0).sum())
    if captionless:
        raise ValueError(f"{captionless} image(s) without a caption: image -> text recall is undefined for them")
    images, texts = images.float(), texts.to(images.device, torch.float32)
    if not (torch.isfinite(images).all() and torch.isfinite(texts).all()):
        raise ValueError("embeddings hold NaN or infinite values")
    return images, texts, owner


@torch.no_grad()
def embed_pairs(
    model: torch.nn.Module,
    image_batches: Iterable[torch.Tensor],
    captions: Sequence[str],
    device: torch.device | str,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings [N_img, E], caption embeddings [N_txt, E]), L2-normalised, in the
    model's output dtype, from preprocessed image batches and ``batch_size`` captions at a time;
    the model runs in eval mode (its mode restored afterwards) without gradients."""
    from declip_fast.data.tokenizer import tokenize

    context = getattr(getattr(getattr(model, "config", None), "text", None), "context_length", 77)
    with eval_mode(model):
        dtype = model_dtype(model)
        images = [model.encode_image(x.to(device, dtype), normalize=True) for x in image_batches]
        texts = []
        for start in range(0, len(captions), batch_size):
            tokens = tokenize(list(captions[start : start + batch_size]), context_length=context).to(device)
            texts.append(model.encode_text(tokens, normalize=True))
    if not images or not texts:
        raise ValueError("no images or no captions to evaluate")
    return torch.cat(images), torch.cat(texts)


def evaluate_retrieval(
    model: torch.nn.Module,
    image_batches: Iterable[torch.Tensor],
    captions: Sequence[str],
    text_to_image: torch.Tensor,
    device: torch.device | str,
    batch_size: int = 256,
    chunk_size: int = 1024,
) -> dict:
    """:func:`recall_at_k` of the model's embeddings (:func:`embed_pairs`) of held-out pairs."""
    images, texts = embed_pairs(model, image_batches, captions, device, batch_size)
    return recall_at_k(images, texts, torch.as_tensor(text_to_image), chunk_size=chunk_size)


# -- held-out pairs ------------------------------------------------------------------------------


class HeldOutPairs(NamedTuple):
    images: list  # one ``sources.Blob`` per distinct image, in order of first appearance
    captions: list[str]
    text_to_image: torch.Tensor  # int64 [len(captions)]: the index in ``images`` of each caption's image


def read_pairs(source: str | os.PathLike) -> HeldOutPairs:
    """The images and captions of a held-out pair source (a CSV/TSV, a folder of images with
    ``.txt`` captions, or tar shards: see the module docstring). Images are not decoded here.
    A row or file that cannot be used is a ``ValueError`` naming it (the first of them)."""
    from declip_fast.data.decode import BadSample
    from declip_fast.data.sources import Blob, list_pairs

    pairs, skips = list_pairs(source)
    if skips:
        more = f" (and {len(skips) - 1} more problem(s))" if len(skips) > 1 else ""
        raise ValueError(f"{skips[0].source}: {skips[0].reason}{more}")
    if not pairs:
        raise ValueError(f"{source}: no image-text pairs")
    index: dict = {}
    images, captions, owner = [], [], []
    for pair in pairs:
        if not isinstance(pair.image, Blob):
            raise ValueError(f"{pair.source}: missing image")
        try:
            texts = _captions(pair.caption)
        except BadSample as bad:
            raise ValueError(f"{pair.source}: {bad}") from None
        key = (os.path.abspath(pair.image.path), pair.image.offset, pair.image.size)
        if key not in index:
            index[key] = len(images)
            images.append(pair.image)
        captions += texts
        owner += [index[key]] * len(texts)
    return HeldOutPairs(images, captions, torch.tensor(owner, dtype=torch.long))


def _captions(raw) -> list[str]:
    """A table cell is one caption; a caption file (path or tar member) holds one per non-blank line."""
    from declip_fast.data.decode import BadSample, caption_text, read_bytes

    if raw is None or isinstance(raw, str):
        return [caption_text(raw)]
    data = raw if isinstance(raw, bytes) else read_bytes(raw, "caption")
    lines = [line for line in data.splitlines() if line.strip()]
    if not lines:
        raise BadSample("empty caption")
    return [caption_text(line) for line in lines]


def retrieval_eval(
    model: torch.nn.Module,
    source: str | os.PathLike | HeldOutPairs,
    device: torch.device | str,
    image_size: int,
    batch_size: int = 256,
    num_workers: int | None = None,
) -> dict:
    """Image <-> text recall@1/5/10 (:func:`recall_at_k`) of ``model`` on the held-out pairs of
    ``source`` (a path for :func:`read_pairs`, or what it returned), images read as the zero-shot
    evaluation reads an image folder."""
    from declip_fast.eval.images import _ImageFiles  # the zero-shot folder reader's decode + crop

    pairs = source if isinstance(source, HeldOutPairs) else read_pairs(source)
    if num_workers is None:
        num_workers = max(1, min(8, os.cpu_count() or 1))
    dataset = _ImageFiles(pairs.images, image_size)
    batches = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    return evaluate_retrieval(model, batches, pairs.captions, pairs.text_to_image, device, batch_size)

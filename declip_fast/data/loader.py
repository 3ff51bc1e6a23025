"""The data config, the batch contract, and the one place that picks FFCV or the torch fallback.

Batch contract (both backends, identical keys, dtypes, shapes and value ranges). Every batch is a
``dict`` of tensors on the target device (the caption lengths stay on the host), B =
``batch_size`` (fewer only in batches that lost undecodable images, counted in
``loader.skipped``, or in a last batch kept with ``drop_last=False``):

=============  =====================  =========================================================
key            dtype / shape          content
=============  =====================  =========================================================
images_1       float32 [B, 3, S, S]   view 1: random resized crop (scale ``crop_scale``) + flip,
                                      then :func:`declip_fast.data.augment.augment` (colour
                                      jitter, grayscale, blur), ImageNet-normalized. S =
                                      ``image_size``. Values in [(0 - mean) / std, (1 - mean) / std]
                                      per channel, i.e. about [-2.12, 2.64].
images_2       float32 [B, 3, S, S]   view 2: an independent draw of the same; only with
                                      ``two_views``.
text_1         int64 [B, 77]          the caption's CLIP token ids; with ``mlm`` the MLM-masked
                                      ids of :func:`declip_fast.data.masking.mask_tokens`.
mlm_targets    int64 [B, 77]          only with ``mlm``: the original id where a token was chosen
                                      for MLM, ``IGNORE_INDEX`` (-100) everywhere else.
text_2         int64 [B, 77]          only with ``eda``: the token ids of one EDA variant of the
                                      caption (FFCV: one of the 4 written per sample, drawn per
                                      sample and epoch; fallback: EDA run at load time).
text_1_lengths int64 [B], on the CPU  the tokens of each caption of ``text_1`` up to and including
                                      its end-of-text token: what the packed text tower needs on
                                      the host (declip_fast.models.packing), without a device sync.
text_2_lengths int64 [B], on the CPU  the same for ``text_2``; only with ``eda``.
index          int64 [B]              the sample's row in the dataset (``.beton`` row / source row).
=============  =====================  =========================================================

Randomness and resuming: every draw is seeded, so two loaders with the same config give the same
batches, and batch k of an epoch does not depend on the batches before it. The sample order comes
from (``seed``, epoch); masking, the EDA pick and the colour augmentations from (``seed``, epoch,
rank, batch index) (:func:`batch_seed`); the fallback's crops, flips and EDA from (``seed``,
epoch, sample); FFCV's fused decoder seeds each sample's crops and flips from (``seed``, the
batch's sample ids, the sample's place in the batch) (:func:`declip_fast.data.ffcv_decoder.two_view_decoder`).
FFCV with ``ffcv_fused_views=False`` is the exception: its crops and flips are FFCV's own, drawn
from numba's unseeded generator. Text randomness is drawn on the CPU, so it does not depend on
the device. Batches are bit-identical on the CPU (tested); the colour augmentations are drawn
and applied on the device, so on a GPU expect the same draws but not a bit-identity promise.

Epochs: iterating a loader runs its next epoch (0, 1, ... by itself); ``set_epoch(epoch,
start_batch=0)`` picks the epoch the next iteration runs and the batch it starts at: a run killed
after k batches of epoch e resumes with ``set_epoch(e, k)`` and gets batches k, k+1, ... exactly
as the uninterrupted run did, without loading the first k. ``loader.position`` is
``{"epoch": e, "batch": b}``, the next batch to load (after an epoch's last batch, ``{"epoch":
e + 1, "batch": 0}``); ``state_dict()`` / ``load_state_dict()`` save and restore it.

Backends: ``"ffcv"`` reads a ``.beton`` written by ``declip_fast.data.write`` (fields ``image``,
``tokens``, ``eda_tokens``, ``index``); ``"torch"`` reads the raw pairs (a CSV of
``image,caption`` rows, or a folder of images each with a same-named ``.txt`` caption) with a
torch DataLoader; ``"auto"`` takes FFCV when it imports and ``beton`` is set, the fallback
otherwise. Distributed: rank and world size come from the config or, when those are unset, from
an initialized ``torch.distributed`` process group; each rank reads a disjoint shard each epoch.
"""

from __future__ import annotations

import logging

import torch

# The shared types and seeds live in loader_config (the backends import them from there);
# re-exported here, where they always were.
from declip_fast.data.loader_config import (  # noqa: F401  (re-exported)
    BACKENDS,
    BatchViews,
    DataConfig,
    ResumableEpochs,
    _from_dict,
    batch_seed,
    epoch_seed,
    rank_and_world,
    shard_order,
    subset_indices,
)

log = logging.getLogger(__name__)


def ffcv_import_error() -> str | None:
    """Why FFCV cannot be used here (None when it imports)."""
    try:
        import ffcv  # noqa: F401
        import ffcv.loader  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native build (OSError, numba errors)
        return f"{type(exc).__name__}: {exc}"
    return None


def choose_backend(config: DataConfig) -> str:
    """The backend that will run: the one place that decides between FFCV and the fallback."""
    if config.backend == "torch":
        return "torch"
    reason = ffcv_import_error()
    if config.backend == "ffcv":
        if reason is not None:
            raise ImportError(
                f"backend='ffcv' was asked for, but FFCV cannot be imported ({reason}). Install it "
                "with pip install 'declip-fast[ffcv]' (needs libopencv-dev libturbojpeg0-dev "
                "pkg-config), or set backend='torch' (or 'auto') to use the torch fallback."
            )
        if config.beton is None:
            raise ValueError("backend='ffcv' needs config.beton, the .beton file to read")
        return "ffcv"
    if reason is None and config.beton is not None:
        return "ffcv"
    if config.source is None:
        why = f"FFCV cannot be imported ({reason})" if reason else "config.beton is not set"
        raise ValueError(
            f"no usable data: {why}, and config.source (the raw pairs for the torch fallback) is not set either"
        )
    if reason is not None and config.beton is not None:
        log.warning("FFCV cannot be imported (%s): reading %s with the torch fallback instead", reason, config.source)
    return "torch"


def build_loader(config: DataConfig, device: torch.device | str = "cpu"):
    """The loader for ``config``: iterate it for contract batches (module docstring) on ``device``.

    It has ``len()`` (batches per epoch on this rank), ``set_epoch(epoch, start_batch=0)``,
    ``position``, ``state_dict()`` / ``load_state_dict()``, ``backend`` and ``skipped`` (samples
    dropped so far because their image could not be decoded: log it).
    """
    device = torch.device(device)
    backend = choose_backend(config)
    rank, world = rank_and_world(config)
    if backend == "ffcv":
        from declip_fast.data.ffcv_loader import FFCVLoader

        loader = FFCVLoader(config, device, rank, world)
        what = config.beton
    else:
        from declip_fast.data.torch_loader import TorchLoader

        loader = TorchLoader(config, device, rank, world)
        what = config.source
    if len(loader) == 0:
        raise ValueError(
            f"{what}: {loader.num_samples} samples (fraction {config.fraction}) over {world} "
            f"rank(s) make no batch of {config.batch_size} (drop_last={config.drop_last}); "
            "lower data.batch_size or raise data.fraction"
        )
    log.info(
        "data loader: %s backend reading %s (rank %d of %d, %d workers, batch %d, device %s)",
        backend,
        what,
        rank,
        world,
        config.workers(),
        config.batch_size,
        device,
    )
    return loader

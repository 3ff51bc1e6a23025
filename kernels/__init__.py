"""Triton kernels and their plain-torch references (installed as declip_fast.kernels).

The functional API, and the one place where the torch / Triton choice is made:

- :func:`clip_loss`: the contrastive loss, ``mode`` "symmetric", "rows" or "gathered";
- :func:`nearest`: the top-1 inner-product search (not named ``nn_lookup``: that is the Triton
  module's name, which importing the submodule rebinds on this package, and which callers import
  as ``from declip_fast.kernels import nn_lookup``);
- :func:`linear_cross_entropy`: the cross-entropy of a linear layer's output without its logits
  (the MLM head's loss; torch only so far, in ``linear_ce``);
- :func:`siglip_loss`: the sigmoid (SigLIP) loss without its logits, ``mode`` "local" or
  "gathered" (torch in ``reference_siglip``; the Triton kernel, when present, in ``siglip``);
- :func:`resolve_impl`: ``impl`` ("auto" | "torch" | "triton") and a tensor to the implementation
  that runs, for a named kernel (``KERNELS``).

The losses and the models call only these. Each implementation module is imported inside the
function that uses it: importing ``declip_fast.kernels`` imports neither Triton nor the kernels'
modules. The four levels of one op (kernels, launchers, autograd Function, plain function) stay
in ``contrastive_jit`` + ``contrastive`` / ``nn_lookup`` and ``reference`` (one ``reference_*``
module per op, re-exported there), whose plain functions keep their signatures.
"""

from __future__ import annotations

import importlib

IMPLS = ("auto", "torch", "triton")
MODES = ("symmetric", "rows", "gathered")
# Kernel name -> its Triton module under declip_fast.kernels (None: no Triton implementation yet).
KERNELS = {"contrastive": "contrastive", "nn_lookup": "nn_lookup", "linear_ce": None, "siglip": "siglip"}
SIGLIP_MODES = ("local", "gathered")


def _triton_available(kernel: str) -> bool:
    try:
        importlib.import_module(f"declip_fast.kernels.{KERNELS[kernel]}")
    except ImportError:  # no Triton on this machine
        return False
    return True


def check_impl(impl: str) -> None:
    """ValueError unless ``impl`` is one of ``IMPLS`` (for constructors, before any tensor)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def resolve_impl(impl: str, tensor, kernel: str = "contrastive") -> str:
    """The one dispatch point: "torch" or "triton" for ``kernel`` on ``tensor``'s device.

    "auto" is Triton on CUDA tensors when the kernel's module imports, else torch; "triton" on a
    non-CUDA tensor is a ValueError, and a NotImplementedError when the kernel has no Triton
    implementation or its module cannot be imported (each kernel is checked on its own, since
    each needs only Triton and the device).
    """
    check_impl(impl)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {tuple(KERNELS)}, got {kernel!r}")
    if impl == "auto":
        has_triton = KERNELS[kernel] is not None
        return "triton" if has_triton and tensor.is_cuda and _triton_available(kernel) else "torch"
    if impl == "triton":
        if KERNELS[kernel] is None:
            raise NotImplementedError(f"{kernel} has no Triton kernel yet; use impl='torch' or 'auto'")
        if not tensor.is_cuda:
            raise ValueError(f"impl='triton' needs CUDA tensors, got device {tensor.device}")
        if not _triton_available(kernel):
            raise NotImplementedError(f"the Triton kernel declip_fast.kernels.{kernel} cannot be imported")
    return impl


def clip_loss(
    image,
    text,
    logit_scale,
    *,
    mode: str = "symmetric",
    offset: int = 0,
    group=None,
    out_dtype=None,
    impl: str = "auto",
):
    """The contrastive loss over ``s * image @ text.T`` (``s`` = ``logit_scale``, a 0-d tensor).

    ``mode``:
      - "symmetric": the CLIP loss over matching rows (labels on the diagonal; ``offset`` 0);
      - "rows": one-direction InfoNCE, row i of ``image`` matches row ``offset + i`` of ``text``;
      - "gathered": this rank's share of the global-batch loss, ``image`` this rank's B rows,
        ``text`` all N texts gathered with gradient, ``offset`` rank * B, column statistics
        folded across ``group``: per-rank values equal OpenCLIP's local loss, gradients averaged
        over ranks equal the single-process global-batch loss's.
    ``out_dtype``: the loss's dtype (None: the inputs'). ``impl``: see :func:`resolve_impl`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "symmetric" and offset != 0:
        raise ValueError(f"mode='symmetric' takes no offset, got {offset!r}")
    impl = resolve_impl(impl, image, "contrastive")
    if impl == "triton":
        from declip_fast.kernels import contrastive as mod
    else:
        from declip_fast.kernels import reference as mod
    if mode == "symmetric":
        return mod.clip_loss(image, text, logit_scale, out_dtype=out_dtype)
    if mode == "rows":
        return mod.clip_loss_rows(image, text, logit_scale, offset, out_dtype=out_dtype)
    return mod.clip_loss_gathered(image, text, logit_scale, offset, group, out_dtype=out_dtype)


def nearest(queries, bank, valid: int | None = None, *, impl: str = "auto"):
    """Top-1 inner-product search of ``queries`` [B, D] over ``bank[:valid]`` [M, D]: (scores
    float32 [B], indices int64 [B]), ties to the lowest index. ``impl``: see :func:`resolve_impl`."""
    impl = resolve_impl(impl, queries, "nn_lookup")
    if impl == "triton":
        from declip_fast.kernels import nn_lookup

        return nn_lookup.nn_lookup(queries, bank, valid)
    from declip_fast.kernels import reference

    return reference.nn_lookup(queries, bank, valid)


def linear_cross_entropy(
    x, weight, bias, targets, ignore_index: int = -100, reduction: str = "mean", tile=None, *, impl: str = "auto"
):
    """``F.cross_entropy(F.linear(x, weight, bias), targets, ignore_index=..., reduction=...)``
    without storing the ``[K, V]`` logits: ``x [K, D]``, ``weight [V, D]``, ``bias [V]`` or None,
    ``targets [K]``; ``ignore_index`` is ``linear_ce.IGNORE_INDEX`` (-100) by default;
    ``reduction`` "mean" or "sum"; ``tile`` (rows, columns) of logits held at once (None: the
    device's default). See ``linear_ce`` for the numerics. ``impl``: see :func:`resolve_impl`;
    there is no Triton kernel yet, so "auto" is torch on every device and "triton" a
    NotImplementedError."""
    resolve_impl(impl, x, "linear_ce")  # "torch" whatever the device, for now
    from declip_fast.kernels import linear_ce

    return linear_ce.linear_cross_entropy(x, weight, bias, targets, ignore_index, reduction, tile)


def siglip_loss(
    image,
    text,
    logit_scale,
    logit_bias,
    *,
    offset: int | None = 0,
    group=None,
    mode: str = "local",
    out_dtype=None,
    impl: str = "auto",
):
    """The SigLIP loss ``(1/B) sum_ij softplus(-y_ij (s image_i . text_j + bias))`` without its
    ``[B, N]`` logits; ``y_ij`` = +1 where ``j == offset + i``, -1 elsewhere (``offset=None``: no
    positives). ``logit_scale`` and ``logit_bias``: one-element tensors.

    ``mode``:
      - "local": ``image`` [B, D] against ``text`` [N, D] as given;
      - "gathered": this rank's share of the global-batch loss: ``image`` this rank's B rows,
        ``text`` all N = W * B texts gathered with gradient (``all_gather_with_grad``), ``offset``
        rank * B (checked against ``group`` when a process group is initialized). Each logit
        depends on its pair alone, so nothing is exchanged here: the value equals OpenCLIP's
        per-rank SigLipLoss, and the gather's backward sums every rank's text gradients into
        their owners, which gives OpenCLIP's gradients for every ``dist_impl``.
    ``out_dtype``: the loss's dtype (None: the inputs'). ``impl``: see :func:`resolve_impl`.
    """
    if mode not in SIGLIP_MODES:
        raise ValueError(f"mode must be one of {SIGLIP_MODES}, got {mode!r}")
    if mode == "gathered":
        from declip_fast.kernels.reference_siglip import check_siglip

        check_siglip(image, text, logit_scale, logit_bias, offset, out_dtype)
        _check_gathered(image, text, offset, group)
    impl = resolve_impl(impl, image, "siglip")
    if impl == "triton":
        from declip_fast.kernels import siglip as mod
    else:
        from declip_fast.kernels import reference_siglip as mod
    return mod.siglip_loss(image, text, logit_scale, logit_bias, offset, out_dtype=out_dtype)


def _check_gathered(image, text, offset, group) -> None:
    """mode="gathered": with an initialized process group, ``text`` must hold world * B rows and
    ``offset`` be rank * B (without one, the caller's layout is taken as given)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return
    world, rank, b = dist.get_world_size(group), dist.get_rank(group), image.shape[0]
    if text.shape[0] != world * b or offset != rank * b:
        raise ValueError(
            f"mode='gathered' needs all {world} ranks' texts ({world * b} rows, got {text.shape[0]}) "
            f"and offset = rank * B = {rank * b}, got {offset!r}"
        )

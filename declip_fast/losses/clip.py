"""ClipLoss: a drop-in for ``open_clip.loss.ClipLoss`` that never stores the logits.

Same constructor, same ``forward`` and the same values and gradients as OpenCLIP in every
(local_loss, gather_with_grad) mode, but the B x N logits exist only one tile at a time (see
``declip_fast.kernels.reference``). Distributed semantics, with W ranks of B rows each:

- ``local_loss=True``: rank r scores its B image rows against all N texts and its B text rows
  against all N images (labels r*B + i). With ``gather_with_grad=True`` the gathered features
  carry gradient back to their owners, and gradients averaged across ranks equal those of the
  single-process loss over the global batch: the mode that scales.
- ``local_loss=False``: every rank computes the full N x N symmetric loss; only its own slice
  carries gradient unless ``gather_with_grad=True`` (OpenCLIP's semantics, kept as they are).

``impl`` picks the implementation: ``"torch"`` (tiled, any device), ``"triton"`` (the fused GPU
kernel), or ``"auto"`` (Triton on CUDA tensors when available, else torch). The choice is made in
one place, ``declip_fast.kernels.resolve_impl`` (re-exported here under its old name). The
scalable mode gathers only the texts, with either implementation (``kernels.clip_loss`` with
``mode="gathered"``): per-rank losses equal OpenCLIP's, and gradients averaged over ranks equal
the global-batch loss's (on Triton the per-rank split of the logit_scale gradient differs from
OpenCLIP's, its average does not; the torch path gives OpenCLIP's split).

Mixed precision follows one rule, :func:`autocast_inputs`, shared by every contrastive loss here.

``get_logits`` and ``get_ground_truth`` (with the ``labels`` / ``prev_num_logits`` cache) are
OpenCLIP's, for code that needs the logits themselves: that path stores them, forward never takes it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from declip_fast import kernels
from declip_fast.kernels import IMPLS, resolve_impl  # noqa: F401  (re-exported: the old home)


def autocast_inputs(*tensors: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.dtype | None]:
    """The mixed-precision contract of the contrastive losses: ``(tensors, out_dtype)``.

    Under ``torch.autocast`` for the tensors' device type, floating tensors are cast to the
    autocast dtype (float64 left alone, as autocast leaves it) and the loss is to be returned
    in float32: OpenCLIP's loss is autocast's ``cross_entropy``, which runs in float32, and an
    fp16 loss breaks GradScaler, whose initial scale 65536 (above fp16's 65504) reaches the loss
    as its upstream gradient: inf in fp16, whatever the loss, so the step is skipped (the first
    one, and again each time the scale grows back). The cast matters as much: autocast computes
    ``normalize`` in float32, so features often reach the loss in float32, and the fused kernel
    must see the 16-bit ones to run at 16-bit speed. Outside autocast nothing is cast and
    ``out_dtype`` is None: the loss comes back in the inputs' dtype, as plain cross_entropy's.
    The kernels compute in float32 either way and cast the loss once, at the end.
    """
    device_type = tensors[0].device.type
    # Devices autocast does not know (meta) are never under it.
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return tensors, None
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t

    cast_tensors = tuple(cast(t) for t in tensors)
    return cast_tensors, None if tensors[0].dtype == torch.float64 else torch.float32


def as_scalar(name: str, value, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a number or a one-element floating tensor on ``like``'s device) as a 0-d tensor;
    a ValueError naming ``name`` otherwise. Shared with ``declip_fast.losses.nns``."""
    if not isinstance(value, torch.Tensor):
        if not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a scalar tensor or a number, got {type(value).__name__}")
        return torch.tensor(float(value), dtype=torch.float32, device=like.device)
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {value.dtype}")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
    return value.reshape(())


_as_scalar = as_scalar  # the old private name, kept for one release


def check_features(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    """Raise ValueError naming the problem when the two feature batches cannot be paired."""
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, dim], got shape {tuple(t.shape)}")
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features {tuple(image_features.shape)} and text_features "
            f"{tuple(text_features.shape)} must have the same shape"
        )
    if image_features.device != text_features.device:
        raise ValueError(f"image_features on {image_features.device} but text_features on {text_features.device}")
    if image_features.dtype != text_features.dtype:
        raise ValueError(f"image_features are {image_features.dtype} but text_features are {text_features.dtype}")


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over image/text features; see the module docstring."""

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        impl: str = "auto",
    ):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod=True is not supported; launch with torchrun instead")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        kernels.check_impl(impl)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        # forward builds no labels tensor; cache_labels only applies to get_ground_truth.
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.impl = impl
        # What OpenCLIP code reads off a ClipLoss (get_ground_truth's cache; horovod is refused).
        self.use_horovod = False
        self.prev_num_logits = 0
        self.labels: dict[torch.device, torch.Tensor] = {}

    def _gather(self, features: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        from declip_fast.distributed import collectives

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                f"ClipLoss(world_size={self.world_size}) needs an initialized torch.distributed "
                "process group (torchrun + dist.init_process_group)"
            )
        if self.gather_with_grad:
            return collectives.all_gather_with_grad(features)
        gathered = collectives.all_gather_no_grad(features)
        if self.local_loss:
            return gathered
        # As OpenCLIP: the local slice keeps its gradient, the other ranks' slices have none.
        b = features.shape[0]
        lo, hi = self.rank * b, (self.rank + 1) * b
        return torch.cat([gathered[:lo], features, gathered[hi:]])

    # -- OpenCLIP's memory-hungry path: the logits, stored -----------------------------------
    # forward never calls these two. They are OpenCLIP's, for code written against its ClipLoss
    # that needs the logits themselves (its DistillClipLoss, custom losses, logging): they store
    # the B x N (or N x N) logits, twice, as OpenCLIP does.

    def get_ground_truth(self, device, num_logits: int) -> torch.Tensor:
        """OpenCLIP's labels: ``arange(num_logits)``, offset by ``num_logits * rank`` with
        several ranks and ``local_loss``; cached per device when ``cache_labels``."""
        if self.prev_num_logits != num_logits or device not in self.labels:
            labels = torch.arange(num_logits, device=device, dtype=torch.long)
            if self.world_size > 1 and self.local_loss:
                labels = labels + num_logits * self.rank
            if self.cache_labels:
                self.labels[device] = labels
                self.prev_num_logits = num_logits
        else:
            labels = self.labels[device]
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """OpenCLIP's ``(logits_per_image, logits_per_text)``, stored in full: ``[B, N]`` each with
        several ranks and ``local_loss`` (this rank's rows against every rank's columns), else
        ``[N, N]`` over the gathered batch (``logits_per_text`` then a transposed view of
        ``logits_per_image``, and ``logit_bias`` lands on that one matrix twice, as in OpenCLIP);
        ``[B, B]`` with one rank. Features are gathered as OpenCLIP's ``gather_features`` does
        (with gradient for ``gather_with_grad``, else only the local slice keeps one)."""
        if self.world_size > 1:
            all_image, all_text = self._gather(image_features), self._gather(text_features)
            if self.local_loss:
                logits_per_image = logit_scale * image_features @ all_text.T
                logits_per_text = logit_scale * text_features @ all_image.T
            else:
                logits_per_image = logit_scale * all_image @ all_text.T
                logits_per_text = logits_per_image.T
        else:
            logits_per_image = logit_scale * image_features @ text_features.T
            logits_per_text = logit_scale * text_features @ image_features.T
        if logit_bias is not None:
            logits_per_image += logit_bias
            logits_per_text += logit_bias
        return logits_per_image, logits_per_text

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        logit_bias=None,
        output_dict: bool = False,
    ):
        check_features(image_features, text_features)
        scale = as_scalar("logit_scale", logit_scale, image_features)
        # Cast before any gather: 16-bit features also halve the collectives' traffic.
        (image_features, text_features), out_dtype = autocast_inputs(image_features, text_features)
        loss_fn = functools.partial(kernels.clip_loss, logit_scale=scale, out_dtype=out_dtype, impl=self.impl)
        offset = self.rank * image_features.shape[0]

        if self.world_size > 1 and self.local_loss and self.gather_with_grad:
            # The scalable mode: only texts are gathered, column statistics are all-gathered
            # instead, and each logit of the global matrix is computed once in the whole job.
            loss = loss_fn(image_features, self._gather(text_features), mode="gathered", offset=offset)
        elif self.world_size > 1:
            all_image = self._gather(image_features)
            all_text = self._gather(text_features)
            if self.local_loss:
                loss = (
                    loss_fn(image_features, all_text, mode="rows", offset=offset)
                    + loss_fn(text_features, all_image, mode="rows", offset=offset)
                ) / 2
            else:
                loss = loss_fn(all_image, all_text)
        else:
            loss = loss_fn(image_features, text_features)

        if logit_bias is not None:
            # A bias shared by every logit cancels in the softmax: no change to the loss, and
            # its gradient is exactly zero. Keep it in the graph so it still receives one.
            bias = as_scalar("logit_bias", logit_bias, image_features)
            loss = loss + 0.0 * bias.to(loss.dtype)
        return {"contrastive_loss": loss} if output_dict else loss

"""SigLipLoss: a drop-in for ``open_clip.loss.SigLipLoss`` that never stores the logits.

Same constructor (``chunk_size``, which newer OpenCLIP versions take, and ``impl`` added), same
``forward``, and the same per-rank values and gradients as OpenCLIP, but the ``B x N`` logits,
labels and log-sigmoids exist only one tile at a time: ``declip_fast.kernels.siglip_loss``, whose
torch path (``kernels/reference_siglip.py``) computes the gradients in the forward, since the
gradient of each logit depends on that logit alone.

Distributed: with ``world_size`` W > 1, OpenCLIP's rank r scores its B images against its own B
texts (positives on the diagonal) and against every other rank's texts (all negatives), the texts
passed around by ``dist_impl`` ("bidir" and "shift": neighbour exchanges; "reduce": all-reduces;
"gather": an all-gather). Whatever ``dist_impl`` says, here the texts are all-gathered once with
gradient (``all_gather_with_grad``) and rank r computes its share, B images against all N = W * B
texts with the positives at offset r * B, in one call: every logit of the global batch is
computed once in the job, per-rank losses equal OpenCLIP's, and the gather's backward sums the
text gradients into their owners as OpenCLIP's exchanges do, so every feature, logit_scale and
logit_bias gradient equals OpenCLIP's on every rank. ``dist_impl`` is checked and recorded only.

Mixed precision follows :func:`declip_fast.losses.clip.autocast_inputs`: under ``torch.autocast``
the features are cast to the autocast dtype (the products run at 16-bit speed, accumulated in
fp32, as autocast's matmul does) and the loss comes back in float32. What OpenCLIP returns there
(measured with torch 2.14 on the CPU, bf16 and fp16 autocast): its logits are 16-bit (autocast's
matmul) but the labels take the features' dtype, so ``labels * logits`` and the loss are float32
for float32 features, as ours is (the usual case: autocast computes ``normalize`` in float32).
For 16-bit features OpenCLIP's loss is 16-bit; ours stays float32 on purpose (a 16-bit sum of
B * N terms is coarse, and an fp16 loss overflows GradScaler's initial scale). Outside autocast
the loss has the features' dtype, as OpenCLIP's.
"""

from __future__ import annotations

import torch
from torch import nn

from declip_fast import kernels
from declip_fast.losses.clip import as_scalar, autocast_inputs, check_features

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


class SigLipLoss(nn.Module):
    """Sigmoid loss for language-image pre-training (SigLIP), OpenCLIP's interface; see the
    module docstring. ``impl``: "auto" | "torch" | "triton" (``declip_fast.kernels.resolve_impl``)."""

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        chunk_size: int | None = None,
        impl: str = "auto",
    ):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        dist_impl = dist_impl or "bidir"
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {DIST_IMPLS} or None, got {dist_impl!r}")
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
        kernels.check_impl(impl)
        self.cache_labels = cache_labels  # kept for the signature: no labels tensor is ever built
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl  # recorded: every dist_impl runs as one gather (module docstring)
        self.chunk_size = chunk_size  # recorded: the tiles are sized by the kernel, never B x N
        self.impl = impl
        # OpenCLIP's cache state, kept for code that reads it (never filled here).
        self.prev_num_logits = 0
        self.labels: dict = {}

    # ---- OpenCLIP's helpers: the dense, memory-hungry path (B x N tensors), kept for callers ----

    def get_ground_truth(self, device, dtype, num_logits, negative_only=False) -> torch.Tensor:
        """OpenCLIP's ``[num_logits, num_logits]`` labels (+1 on the diagonal unless
        ``negative_only``, -1 elsewhere). Dense: ``forward`` never calls it."""
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        if not negative_only:
            labels = 2 * torch.eye(num_logits, device=device, dtype=dtype) + labels
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None) -> torch.Tensor:
        """OpenCLIP's dense ``[B, N]`` logits, ``logit_scale * image @ text.T + logit_bias``.
        Dense: ``forward`` never calls it."""
        logits = logit_scale * image_features @ text_features.T
        if logit_bias is not None:
            logits += logit_bias
        return logits

    def _loss(self, image_features, text_features, logit_scale, logit_bias=None, negative_only=False):
        """OpenCLIP's one-block loss (positives on the diagonal unless ``negative_only``), through
        the tiled kernel; for code that subclasses OpenCLIP's loss and calls it."""
        check_features(image_features, text_features)
        scale, bias = self._scalars(image_features, logit_scale, logit_bias)
        (image_features, text_features), out_dtype = autocast_inputs(image_features, text_features)
        offset = None if negative_only else 0
        return kernels.siglip_loss(
            image_features, text_features, scale, bias, offset=offset, out_dtype=out_dtype, impl=self.impl
        )

    # ---- the loss ----

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict: bool = False):
        """This rank's SigLIP loss (OpenCLIP's value), a 0-d tensor, or ``{"contrastive_loss": loss}``
        with ``output_dict``. ``logit_bias`` None means no bias, as in OpenCLIP's ``get_logits``."""
        check_features(image_features, text_features)
        scale, bias = self._scalars(image_features, logit_scale, logit_bias)
        # Cast before the gather: 16-bit features also halve the collective's traffic.
        (image_features, text_features), out_dtype = autocast_inputs(image_features, text_features)
        if self.world_size > 1:
            loss = kernels.siglip_loss(
                image_features,
                self._gather(text_features),
                scale,
                bias,
                offset=self.rank * image_features.shape[0],
                mode="gathered",
                out_dtype=out_dtype,
                impl=self.impl,
            )
        else:
            loss = kernels.siglip_loss(image_features, text_features, scale, bias, out_dtype=out_dtype, impl=self.impl)
        return {"contrastive_loss": loss} if output_dict else loss

    def _scalars(self, like: torch.Tensor, logit_scale, logit_bias) -> tuple[torch.Tensor, torch.Tensor]:
        scale = as_scalar("logit_scale", logit_scale, like)
        if logit_bias is None:  # OpenCLIP adds no bias then: a constant 0 without gradient
            return scale, torch.zeros((), dtype=torch.float32, device=like.device)
        return scale, as_scalar("logit_bias", logit_bias, like)

    def _gather(self, features: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        from declip_fast.distributed import collectives

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                f"SigLipLoss(world_size={self.world_size}) needs an initialized torch.distributed "
                "process group (torchrun + dist.init_process_group)"
            )
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"SigLipLoss(world_size={self.world_size}) in a group of {dist.get_world_size()}")
        return collectives.all_gather_with_grad(features)

"""CoCaLoss: a drop-in for ``open_clip.loss.CoCaLoss`` whose contrastive part stores no logits.

CoCa (Yu et al. 2022) adds a captioning loss to CLIP's: the multimodal text decoder predicts each
caption token from the image and the tokens before it, and the loss is the cross-entropy of those
predictions, padding ignored. Same constructor, forward and values as OpenCLIP's:

- the contrastive term is our :class:`~declip_fast.losses.clip.ClipLoss` (every distributed mode,
  the B x N logits never stored, the fused kernel on CUDA), times ``clip_loss_weight``; with a
  zero weight it is not computed and is OpenCLIP's integer zero tensor;
- the caption term is ``F.cross_entropy`` over the vocabulary with ``ignore_index=pad_id``, times
  ``caption_loss_weight``, exactly as OpenCLIP computes it. The fused linear cross-entropy
  (``declip_fast.kernels.linear_cross_entropy``), which avoids storing ``[tokens, vocab]`` logits,
  does not apply here: CoCa's decoder hands the loss its logits ``[B, L, V]`` already computed, so
  there is nothing left to save; it would need the decoder's last hidden states and output
  projection instead, a change to the model's forward, not to the loss.
"""

from __future__ import annotations

import torch
from torch import nn

from declip_fast.losses.clip import ClipLoss


class CoCaLoss(ClipLoss):
    """``(clip_loss, caption_loss)``, each already weighted, or a dict with output_dict."""

    def __init__(
        self,
        caption_loss_weight: float,
        clip_loss_weight: float,
        pad_id: int = 0,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        impl: str = "auto",
    ):
        super().__init__(
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            cache_labels=cache_labels,
            rank=rank,
            world_size=world_size,
            use_horovod=use_horovod,
            impl=impl,
        )
        self.clip_loss_weight = clip_loss_weight
        self.caption_loss_weight = caption_loss_weight
        self.pad_id = pad_id
        self.caption_loss = nn.CrossEntropyLoss(ignore_index=pad_id)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        logit_scale,
        output_dict: bool = False,
    ):
        """``logits`` ``[B, L, V]``, the decoder's predictions; ``labels`` ``[B, L]``, the next
        tokens (``pad_id`` where there is none)."""
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(
                f"logits must be [batch, length, vocab] and labels [batch, length], got logits "
                f"{tuple(logits.shape)} and labels {tuple(labels.shape)}"
            )
        if self.clip_loss_weight:
            clip_loss = self.clip_loss_weight * super().forward(image_features, text_features, logit_scale)
        else:
            clip_loss = torch.tensor(0, device=logits.device)
        caption_loss = self.caption_loss(logits.permute(0, 2, 1), labels) * self.caption_loss_weight
        if output_dict:
            return {"contrastive_loss": clip_loss, "caption_loss": caption_loss}
        return clip_loss, caption_loss

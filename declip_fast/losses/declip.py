"""DeCLIPLoss: CLIP's contrastive loss plus DeCLIP's four supervisions (see ARCHITECTURE.md,
"The DeCLIP objective").

Terms (each reported unweighted, for logging):

- ``clip``: the CLIP loss of the first pair (image view 1, text view 1);
- ``mvs``: multi-view supervision, the CLIP loss averaged over every (image view, text view)
  pair, four with two views of each;
- ``iss``: SimSiam on the image views' projector / predictor outputs;
- ``tss``: masked language modelling on text view 1;
- ``nns``: nearest-neighbour supervision against the text-feature queue (absent, not zero,
  while the queue fills: it is then left out of ``total`` and of the returned dict).

``total = sum(weight[t] * term[t])``. Presets (:data:`PRESETS`): ``paper`` is the paper's
``(1-a-b-c) L_CLIP + a (L_ISS + L_TSS) + b L_MVS + c L_NNS`` with a = b = c = 0.2; ``released``
(the default, what the released code trains) is ``0.4 L_MVS + 0.2 (L_ISS + L_TSS + L_NNS)``;
``clip`` is CLIP alone. A term with weight 0 is never computed, and :meth:`DeCLIPLoss.needs`
tells the model which views and heads to run, so CLIP-only costs what CLIP costs.

Input: the model's feature dict (``declip_fast.models.DeCLIP.forward``): ``image_features`` and
``text_features`` (lists of L2-normalized [B, E] views), ``logit_scale`` (already exponentiated,
like OpenCLIP's), ``image_proj`` / ``image_pred`` (lists per image view) for SimSiam,
``mlm_logits`` [K, V] at the masked positions with ``mlm_targets`` [K], or ``mlm_loss`` (the
model's fused head, which takes precedence). Distributed: the
contrastive terms use the gathered ClipLoss (``local_loss=True, gather_with_grad=True``) and
NNS its gathered neighbours, so gradients averaged over ranks equal the single-process ones.
"""

from __future__ import annotations

import dataclasses
from typing import cast

import torch
from torch import nn

from declip_fast.losses.clip import ClipLoss
from declip_fast.losses.nns import NNSLoss
from declip_fast.losses.ssl import MLMLoss, SimSiamLoss

TERMS = ("clip", "mvs", "iss", "tss", "nns")


@dataclasses.dataclass
class DeCLIPLossConfig:
    """Weights of each term and the NNS queue; see :data:`PRESETS` for the named mixtures."""

    clip: float = 0.0
    mvs: float = 0.4
    iss: float = 0.2
    tss: float = 0.2
    nns: float = 0.2
    queue_size: int = 65536
    impl: str = "auto"

    def __post_init__(self):
        for term in TERMS:
            w = getattr(self, term)
            if not isinstance(w, (int, float)) or w < 0:
                raise ValueError(f"loss weight {term} must be a number >= 0, got {w!r}")
        if not any(getattr(self, t) for t in TERMS):
            raise ValueError("every loss weight is 0: nothing to train")

    @property
    def weights(self) -> dict[str, float]:
        return {t: float(getattr(self, t)) for t in TERMS}

    @classmethod
    def from_name(cls, name: str) -> DeCLIPLossConfig:
        """The named mixture of :data:`PRESETS` (a config may say ``loss: clip``)."""
        return preset(name)


PRESETS = {
    "paper": dict(clip=0.4, mvs=0.2, iss=0.2, tss=0.2, nns=0.2),
    "released": dict(clip=0.0, mvs=0.4, iss=0.2, tss=0.2, nns=0.2),
    "clip": dict(clip=1.0, mvs=0.0, iss=0.0, tss=0.0, nns=0.0),
}


def preset(name: str, **overrides) -> DeCLIPLossConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown DeCLIP loss preset {name!r}; choose from {sorted(PRESETS)}")
    return DeCLIPLossConfig(**{**PRESETS[name], **overrides})


class DeCLIPLoss(nn.Module):
    def __init__(
        self,
        config: DeCLIPLossConfig | str = "released",
        rank: int = 0,
        world_size: int = 1,
        group=None,
        embed_dim: int | None = None,
        device=None,
    ):
        super().__init__()
        self.config = preset(config) if isinstance(config, str) else config
        self.weights = self.config.weights
        self.clip_loss = ClipLoss(
            local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size, impl=self.config.impl
        )
        self.simsiam = SimSiamLoss() if self.weights["iss"] else None
        self.mlm = MLMLoss() if self.weights["tss"] else None
        # With embed_dim the queue exists before the first step, so a checkpoint can fill it.
        self.nns = (
            NNSLoss(
                self.config.queue_size,
                dim=embed_dim,
                rank=rank,
                world_size=world_size,
                impl=self.config.impl,
                group=group,
                device=device,
            )
            if self.weights["nns"]
            else None
        )
        self.world_size, self.group = world_size, group

    def defer_enqueue(self, on: bool = True) -> None:
        """NNS's queue takes a step's rows only at :meth:`commit` (see ``NNSLoss.defer_enqueue``)."""
        if self.nns is not None:
            self.nns.defer_enqueue(on)

    def pending_finite(self) -> torch.Tensor | None:
        """0-d bool tensor: the rows NNS holds for the queue are finite (None: none held)."""
        return None if self.nns is None else self.nns.pending_finite()

    def commit(self, keep: bool) -> None:
        """Enqueue the held rows (``keep``: the step was applied on every rank) or drop them."""
        if self.nns is not None:
            self.nns.commit(keep)

    def needs(self) -> dict[str, int | bool]:
        """What the model must compute for this mixture: views and heads."""
        w = self.weights
        return dict(
            image_views=2 if (w["mvs"] or w["iss"]) else 1,
            text_views=2 if w["mvs"] else 1,
            simsiam=bool(w["iss"]),
            mlm=bool(w["tss"]),
        )

    def forward(self, features: dict) -> dict[str, torch.Tensor]:
        images, texts = self._views(features)
        scale = features["logit_scale"]
        w = self.weights
        losses: dict[str, torch.Tensor] = {}
        # The first pair (image 1, text 1) is the CLIP term and one of the MVS pairs: computed once.
        pairs = [(i, t) for i in images for t in texts] if w["mvs"] else [(images[0], texts[0])]
        if w["clip"] or w["mvs"]:
            values = [self.clip_loss(i, t, scale) for i, t in pairs]
            if w["clip"]:
                losses["clip"] = values[0]
            if w["mvs"]:
                losses["mvs"] = torch.stack(values).mean()
        if w["iss"]:
            p, z = self._require(features, "image_pred", 2), self._require(features, "image_proj", 2)
            losses["iss"] = cast(SimSiamLoss, self.simsiam)(p[0], p[1], z[0], z[1])
        if w["tss"]:
            if features.get("mlm_loss") is not None:
                losses["tss"] = self._global_mlm_mean(features["mlm_loss"], features.get("mlm_count"))
            else:
                logits = self._require(features, "mlm_logits")
                losses["tss"] = cast(MLMLoss, self.mlm)(logits, self._require(features, "mlm_targets"))
        if w["nns"]:
            nns = cast(NNSLoss, self.nns)(images, texts, scale)
            if nns is not None:
                losses["nns"] = nns
        losses["total"] = cast(torch.Tensor, sum(w[name] * value.float() for name, value in losses.items()))
        return losses

    def _global_mlm_mean(self, local_mean: torch.Tensor, count) -> torch.Tensor:
        """Ranks mask different numbers of tokens: rescale each rank's mean so that the average
        over ranks (what gradient averaging computes) is the mean over every masked token of the
        global batch, as in one process. One all-reduce of a count."""
        if self.world_size == 1 or count is None:
            return local_mean
        import torch.distributed as dist

        total = count.detach().to(torch.float32).clone()
        dist.all_reduce(total, group=self.group)
        return local_mean * (count.to(torch.float32) * self.world_size / total.clamp(min=1))

    def _views(self, features: dict):
        images = self._require(features, "image_features")
        texts = self._require(features, "text_features")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        texts = list(texts) if isinstance(texts, (list, tuple)) else [texts]
        need = self.needs()
        if len(images) < need["image_views"] or len(texts) < need["text_views"]:
            raise ValueError(
                f"this loss mixture needs {need['image_views']} image and {need['text_views']} text "
                f"views, got {len(images)} and {len(texts)}"
            )
        return images[: need["image_views"]], texts[: need["text_views"]]

    @staticmethod
    def _require(features: dict, key: str, views: int | None = None):
        if key not in features or features[key] is None:
            raise ValueError(f"the feature dict has no {key!r}, which this loss mixture needs")
        value = features[key]
        if views is not None and (not isinstance(value, (list, tuple)) or len(value) < views):
            raise ValueError(f"{key!r} must be a list of {views} views")
        return value

"""The full model: image tower, text tower, learned logit scale, and DeCLIP's optional heads.

``DeCLIP(config)`` with ``config.simsiam = None`` and ``config.mlm = False`` is plain CLIP: the heads
are not built, so they cost nothing (no parameters, no optimizer state, no FSDP units).

OpenCLIP's interface: ``encode_image(images, normalize=False)``, ``encode_text(tokens,
normalize=False)``, ``logit_scale`` (the raw parameter, ln of the scale; init ln(1/0.07); shape
``[1]`` because FSDP2 cannot shard 0-dim parameters).

``forward(images_1, images_2=None, text_1=None, text_2=None, mlm_positions=None, mlm_targets=None)``
computes only
what it is given and returns the dict ``declip_fast.losses.DeCLIPLoss`` reads (OpenCLIP's forward
conventions: normalised features, exponentiated scale):

- ``image_features``: list, one L2-normalised ``[B, E]`` tensor per image view given;
- ``text_features``: the same per text view;
- ``image_proj`` / ``image_pred``: SimSiam's z and p per view (from the *un-normalised* image
  embeddings, as DeCLIP's SimSiam head takes them), when the heads exist and both image views
  are given;
- ``mlm_logits``: ``[K, vocab]`` for the K positions ``mlm_positions`` selects in ``text_1``'s
  final token states (bool mask ``[B, L]`` or flat int indices, see ``heads.gather_positions``),
  in row-major order: the matching targets are ``targets[mask]``;
- ``mlm_loss`` instead of ``mlm_logits`` when ``mlm_targets`` is given (``[K]`` matching the
  positions, or ``[B, L]`` with -100 where nothing was masked; the positions then default to
  where it is not -100): the mean cross-entropy from ``MLMHead.loss``, which never stores the
  logits, with ``mlm_count`` (how many positions it averages, for the mean over ranks). The
  training path; ``DeCLIPLoss`` takes either form;
- ``text_1_lengths`` / ``text_2_lengths`` (inputs): each view's caption lengths on the host, as
  the loaders hand them out, for the packed text tower (``declip_fast.models.text``); without
  them the tower reads them off the tokens;
- ``logit_scale``: ``exp(self.logit_scale)`` as a 0-dim tensor, unclamped (the trainer keeps
  the parameter in [ln 20, ln 100] after each step, ``train.optim.clamp_logit_scale``).

Heads that are built are used: build the model with ``simsiam=None`` / ``mlm=False`` when the
loss does not need them (``DeCLIPLoss.needs()``), and they cost nothing.

On accelerators, views share one forward pass where the tower is batch-independent (ViT, text,
ResNet in eval): concatenating them halves the kernel launches and, under FSDP2, the parameter
all-gathers per step. On the CPU each view runs alone: the doubled activations fall out of cache,
so one pass over both views is slower than two. The ResNet
in training always runs each view alone so each keeps its own batch-norm statistics.

Meta-device flow (FSDP2): build under ``torch.device("meta")``, shard, ``to_empty(device=...)``,
then ``init_weights()`` re-runs every initialisation (children first, so a parent's scheme, such
as the transformer's scaled normals, wins over the layers' defaults).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from declip_fast.kernels.linear_ce import IGNORE_INDEX
from declip_fast.models.attention import Backend
from declip_fast.models.heads import MLMHead, SimSiamConfig, SimSiamPredictor, SimSiamProjector
from declip_fast.models.resnet import ModifiedResNet, ResNetConfig
from declip_fast.models.text import TextConfig, TextTransformer
from declip_fast.models.vision import VisionTransformer, ViTConfig


@dataclass
class DeCLIPConfig:
    embed_dim: int = 512
    vision: ViTConfig | ResNetConfig = field(default_factory=ViTConfig)
    text: TextConfig = field(default_factory=TextConfig)
    simsiam: SimSiamConfig | None = None  # None: no SimSiam projector / predictor
    mlm: bool = False  # build the MLM head
    init_logit_scale: float = math.log(1 / 0.07)
    attn_backend: Backend = "auto"
    grad_checkpointing: bool = False


def reset_all_parameters(module: nn.Module) -> None:
    """Call ``reset_parameters`` on every submodule, children before parents."""
    for child in module.children():
        reset_all_parameters(child)
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()


class DeCLIP(nn.Module):
    visual: ModifiedResNet | VisionTransformer
    projector: SimSiamProjector | None
    predictor: SimSiamPredictor | None
    mlm_head: MLMHead | None

    def __init__(self, config: DeCLIPConfig):
        super().__init__()
        self.config = config
        embed, backend = config.embed_dim, config.attn_backend
        if isinstance(config.vision, ResNetConfig):
            self.visual = ModifiedResNet(config.vision, embed, attn_backend=backend)
        elif isinstance(config.vision, ViTConfig):
            self.visual = VisionTransformer(config.vision, embed, attn_backend=backend)
        else:
            kind = type(config.vision).__name__
            raise TypeError(f"config.vision must be a ViTConfig or ResNetConfig, got {kind}")
        self.text = TextTransformer(config.text, embed, attn_backend=backend)
        # Shape [1], not a scalar: FSDP2's fully_shard refuses 0-dim parameters (OpenCLIP's
        # nonscalar_logit_scale=True, for the same reason). Conversion reshapes both ways.
        self.logit_scale = nn.Parameter(torch.empty(1))
        self.projector = self.predictor = self.mlm_head = None
        self.fuse_views: bool | None = None  # one forward for both views; None: not on the CPU
        if config.simsiam is not None:
            self.projector = SimSiamProjector(embed, config.simsiam.dim)
            self.predictor = SimSiamPredictor(config.simsiam.dim, config.simsiam.pred_dim)
        if config.mlm:
            self.mlm_head = MLMHead(config.text.width, config.text.vocab_size)
        self.reset_parameters()
        self.set_grad_checkpointing(config.grad_checkpointing)

    # -- set-up ---------------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        nn.init.constant_(self.logit_scale, self.config.init_logit_scale)

    def init_weights(self) -> None:
        """(Re-)initialise every parameter and buffer in place, e.g. after ``to_empty``."""
        reset_all_parameters(self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Per-block activation checkpointing in both transformers (a no-op for the ResNet)."""
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks of both towers: the natural per-block FSDP / checkpoint units."""
        return self.visual.blocks() + self.text.blocks()

    # -- OpenCLIP's interface -------------------------------------------------------------------

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    # -- training forward -----------------------------------------------------------------------

    def forward(
        self,
        images_1: torch.Tensor | None = None,
        images_2: torch.Tensor | None = None,
        text_1: torch.Tensor | None = None,
        text_2: torch.Tensor | None = None,
        mlm_positions: torch.Tensor | None = None,
        mlm_targets: torch.Tensor | None = None,
        text_1_lengths: torch.Tensor | list[int] | None = None,
        text_2_lengths: torch.Tensor | list[int] | None = None,
    ) -> dict:
        if images_2 is not None and images_1 is None:
            raise ValueError("images_2 given without images_1")
        if text_2 is not None and text_1 is None:
            raise ValueError("text_2 given without text_1")
        if mlm_targets is not None and mlm_positions is None:
            if mlm_targets.dim() != 2:
                raise ValueError("mlm_targets without mlm_positions must be [B, L], aligned with text_1")
            mlm_positions = mlm_targets != IGNORE_INDEX
        if mlm_positions is not None and (self.mlm_head is None or text_1 is None):
            raise ValueError("mlm_positions needs text_1 and a model built with the MLM head (mlm=True)")
        # exp of an indexed element: a fresh 0-dim tensor, not a view (FSDP2 warns on view outputs).
        out: dict = {"logit_scale": self.logit_scale[0].exp()}

        images = [v for v in (images_1, images_2) if v is not None]
        if images:
            features = _encode_views(self.visual, images, self.fuse_views)
            if self.projector is not None and len(images) == 2:
                out["image_proj"] = [self.projector(f) for f in features]
                out["image_pred"] = [cast(SimSiamPredictor, self.predictor)(z) for z in out["image_proj"]]
            out["image_features"] = [F.normalize(f, dim=-1) for f in features]

        texts = [t for t in (text_1, text_2) if t is not None]
        if texts:
            lengths = [n for t, n in ((text_1, text_1_lengths), (text_2, text_2_lengths)) if t is not None]
            if mlm_positions is None:
                features = _encode_views(self.text, texts, self.fuse_views, lengths=lengths)
            else:
                features, states = _encode_views(self.text, texts, self.fuse_views, lengths=lengths, return_tokens=True)
                mlm_head = cast(MLMHead, self.mlm_head)  # checked above
                if mlm_targets is None:
                    out["mlm_logits"] = mlm_head(states[0], mlm_positions)
                else:
                    out["mlm_loss"], out["mlm_count"] = mlm_head.loss(
                        states[0], mlm_positions, mlm_targets, return_count=True
                    )
            out["text_features"] = [F.normalize(f, dim=-1) for f in features]
        return out


def _encode_views(
    tower: VisionTransformer | ModifiedResNet | TextTransformer,
    views: list[torch.Tensor],
    fuse: bool | None = None,
    lengths: list[torch.Tensor | list[int] | None] | None = None,
    **kwargs,
):
    """The tower on each view; one concatenated forward when the tower allows it and ``fuse``
    (None: on accelerators, not on the CPU) says so.

    With ``return_tokens=True`` (text) returns ``(features, states)``, each a list per view.
    ``lengths`` (text): each view's host caption lengths, or None to read them off the tokens.
    """
    same_shape = all(v.shape[1:] == views[0].shape[1:] for v in views)
    if fuse is None:
        fuse = views[0].device.type != "cpu"
    fuse = fuse and len(views) > 1 and tower.batch_independent and same_shape
    per_view: list[dict] = [dict(kwargs) for _ in views]
    if lengths is not None:
        for kw, n in zip(per_view, lengths):
            kw["lengths"] = n
    if fuse:
        sizes = [v.shape[0] for v in views]
        if lengths is not None:
            kwargs["lengths"] = (
                None if any(n is None for n in lengths) else torch.cat([torch.as_tensor(n) for n in lengths])
            )
        result = tower(torch.cat(views), **kwargs)
        if isinstance(result, tuple):
            return tuple(list(r.split(sizes)) for r in result)
        return list(result.split(sizes))
    results = [tower(v, **kw) for v, kw in zip(views, per_view)]
    if results and isinstance(results[0], tuple):
        return tuple(list(r) for r in zip(*results))
    return results

"""The text tower: CLIP's causal transformer, with one extra embedding row for ``<mask>``.

Names follow OpenCLIP's CLIP text attributes (``token_embedding``, ``positional_embedding``,
``transformer``, ``ln_final``, ``text_projection``).

Vocabulary. CLIP's BPE has 49,408 ids (``<start_of_text>`` = 49406, ``<end_of_text>`` = 49407);
DeCLIP's MLM adds ``<mask>`` = 49408, so the embedding has 49,409 rows. OpenCLIP checkpoints load
into the first 49,408 rows (``declip_fast.models.openclip`` pads the extra row and drops it again).

Pooling. OpenCLIP pools at ``tokens.argmax(-1)``, which finds EOT only because EOT is the largest
CLIP id. With ``<mask>`` = 49408 in a caption, argmax would pick the mask token. We pool at the
first position holding ``eot_id`` explicitly; for ordinary CLIP tokens this is the same position
as OpenCLIP's argmax. A row with no EOT (not produced by CLIP's tokenizer, which always ends a
truncated caption with EOT) pools at the last position.

Packing (``TextConfig.packed``, on by default). The tower runs on the captions' own tokens only,
packed into one sequence with block-diagonal causal attention (``declip_fast.models.packing``):
exact, because under the causal mask nothing after a caption's EOT reaches its pooled token, and
~5x fewer text-tower FLOPs for web-length captions than the padded 77. ``forward(tokens,
lengths=...)`` takes the lengths on the host (the loaders hand them out with every batch);
without them the tower reads them off the tokens (one device sync on an accelerator). Under
``torch.compile`` or on the meta device without host lengths, and with ``packed=False``, it runs
the padded ``[B, L]`` batch as OpenCLIP does. ``pack_multiple`` rounds the packed length up (a filler caption) so a
compiled tower sees few shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from declip_fast.models.attention import Backend, resolve_backend
from declip_fast.models.init import normal_
from declip_fast.models.packing import PackPlan, lengths_from_tokens
from declip_fast.models.transformer import Transformer

SOT_ID = 49406
EOT_ID = 49407
MASK_ID = 49408
VOCAB_SIZE = 49409  # CLIP's 49,408 BPE ids + <mask>
COMPILE_PACK_MULTIPLE = 64  # packed lengths under compile: multiples of this (few distinct shapes)
OPENCLIP_VOCAB_SIZE = 49408


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = VOCAB_SIZE
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    eot_id: int = EOT_ID
    packed: bool = True  # run the packed captions (exact; see the module docstring)
    pack_multiple: int = 1  # round the packed length up to a multiple (compile: few shapes)


def eot_positions(tokens: torch.Tensor, eot_id: int = EOT_ID) -> torch.Tensor:
    """Index of the first ``eot_id`` in each row of ``tokens [B, L]`` (the last index if none)."""
    return lengths_from_tokens(tokens, eot_id) - 1


class TextTransformer(nn.Module):
    batch_independent = True

    def __init__(self, cfg: TextConfig, output_dim: int, *, attn_backend: Backend = "auto"):
        super().__init__()
        self.cfg, self.output_dim = cfg, output_dim
        self.context_length, self.vocab_size, self.eot_id = cfg.context_length, cfg.vocab_size, cfg.eot_id
        self.attn_backend = attn_backend
        # _weight: skip nn.Embedding's own N(0, 1) init; reset_parameters below sets CLIP's.
        table = torch.empty(cfg.vocab_size, cfg.width)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width, _weight=table)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(
            cfg.width,
            cfg.layers,
            cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            act=cfg.act,
            causal=True,
            attn_backend=attn_backend,
        )
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, output_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        normal_(self.token_embedding.weight, std=0.02)  # CLIP's initialisation
        normal_(self.positional_embedding, std=0.01)
        normal_(self.text_projection, std=self.cfg.width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.set_grad_checkpointing(enable)

    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.resblocks)

    def before_compile(self) -> None:
        """Called by ``distributed.fsdp.parallelize`` before it compiles the blocks: packed
        lengths rounded up to ``COMPILE_PACK_MULTIPLE`` unless a multiple was configured."""
        if self.cfg.pack_multiple == 1:
            self.cfg.pack_multiple = COMPILE_PACK_MULTIPLE

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        return_tokens: bool = False,
        lengths: torch.Tensor | list[int] | None = None,
    ):
        """Embeddings ``[B, output_dim]``; with ``return_tokens`` also the final layer-normed
        token states ``[B, L, width]`` (what the MLM head reads; packed, the states past each
        caption's EOT are zeros, which the MLM head never reads). ``lengths``: the tokens per
        caption up to and including its EOT, on the host (see the module docstring)."""
        seq = tokens.shape[1]
        if seq > self.context_length:
            raise ValueError(f"{seq} tokens exceed the context length {self.context_length}")
        readable = tokens.device.type != "meta" and not torch.compiler.is_compiling()
        if self.cfg.packed and (lengths is not None or readable):
            plan = PackPlan.build(tokens, self.eot_id, lengths, self.cfg.pack_multiple)
            if resolve_backend(self.attn_backend, tokens) == "sdpa":
                plan.buckets()  # the layout, built here once (not inside a compiled block)
            x = self.token_embedding(tokens.reshape(-1).index_select(0, plan.gather))
            x = self.transformer((x + self.positional_embedding[plan.positions]).unsqueeze(0), plan)[0]
            if return_tokens:
                states = self.ln_final(x)
                return states.index_select(0, plan.pool) @ self.text_projection, plan.unpack(states)
            return self.ln_final(x.index_select(0, plan.pool)) @ self.text_projection
        x = self.token_embedding(tokens) + self.positional_embedding[:seq]
        x = self.transformer(x)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        pos = eot_positions(tokens, self.eot_id)
        if return_tokens:
            states = self.ln_final(x)
            return states[rows, pos] @ self.text_projection, states
        # Layer norm is per token: normalising only the pooled one is the same, and cheaper.
        return self.ln_final(x[rows, pos]) @ self.text_projection

"""Packed captions: the text tower over the sum of the caption lengths instead of B x 77 tokens.

Under the causal mask a token sees only the tokens before it, and the tower pools at each caption's
end-of-text token, so nothing a caption's embedding depends on lies after its EOT. Running the tower
on each caption's first ``length = EOT position + 1`` tokens, concatenated into one sequence of
``T = sum(lengths)`` tokens, is therefore exact, provided that

- every token-wise layer (embeddings, layer norms, projections, MLPs) runs on the packed rows as
  it would on the padded ones (it does: they do not mix tokens);
- the positional embedding is indexed by the position *within* the caption;
- attention is block-diagonal causal: a token sees the tokens before it in its own caption only.

:class:`PackPlan` holds the layout: which padded token each packed row comes from, its position,
where each caption ends (the pooled row), and the length buckets the SDPA fallback runs. It is
built from lengths on the host (``lengths=``, as the loaders hand them out with every batch, see
``declip_fast.data.loader``); without them it reads them off the tokens, which on an accelerator
costs one device-to-host sync.

Attention (:func:`packed_attention`):

- ``xformers``: one ``memory_efficient_attention`` call over the packed sequence with
  ``BlockDiagonalCausalMask.from_seqlens(lengths)`` (built once per forward, shared by the layers);
- ``sdpa`` (the CPU, or no xformers): the captions are grouped by length into buckets (lengths
  rounded up to ``BUCKET`` tokens); each bucket runs as a padded ``[b, L_bucket]`` batch through
  SDPA with ``is_causal`` (padding after a caption's end cannot reach it under the causal mask).
  Two gathers per layer move rows between the packed and the bucketed layouts. Chosen by
  measurement (``python -m benchmarks.run benchmarks/bench_packing.py``, 2-core CPU, fp32,
  8 heads of 64, forward + backward, web-like caption lengths) against one padded batch at the
  longest caption and one SDPA call with a dense block-diagonal ``[T, T]`` mask: at batch 128
  (2,127 tokens, longest 77) buckets take 37-43 ms, the longest-caption batch 2.4-2.9x that, the
  mask 6.6-6.9x (two runs); at batch 16 (232 tokens, longest 26) all are within 2 ms (the padded
  batch 0.76-0.92x).

``multiple`` rounds the packed length up with one filler caption (its rows are computed and
dropped), so a compiled tower sees few distinct shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

BUCKET = 16  # SDPA fallback: caption lengths rounded up to a multiple of this form one bucket


def lengths_from_tokens(tokens: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Tokens per caption up to and including its first ``eot_id`` (the whole row if none):
    int64 ``[B]`` on the tokens' device."""
    is_eot = tokens == eot_id
    first = is_eot.int().argmax(dim=-1)  # argmax returns the first maximal index
    last = torch.full_like(first, tokens.shape[-1] - 1)
    return torch.where(is_eot.any(dim=-1), first, last).to(torch.int64) + 1


@dataclass
class PackPlan:
    """The packed layout of ``B`` padded captions ``[B, L]`` (see the module docstring).

    ``lengths``: host list of the caption lengths (each in 1..L); ``seqlens``: every packed
    sequence's length, the filler captions included (sums to ``total``, the packed rows,
    ``>= sum(lengths)``); on the tokens' device: ``gather [total]`` (flat index
    ``b * L + p`` of each packed row's token; the filler reads token 0), ``positions [total]``,
    ``pool [B]`` (each caption's EOT row), ``starts [B]`` (each caption's first row).
    """

    lengths: list[int]
    seqlens: list[int]
    context: int
    total: int
    gather: torch.Tensor
    positions: torch.Tensor
    pool: torch.Tensor
    starts: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        tokens: torch.Tensor,
        eot_id: int,
        lengths: torch.Tensor | list[int] | None = None,
        multiple: int = 1,
    ) -> PackPlan:
        b, context = tokens.shape
        if lengths is None:
            lengths = lengths_from_tokens(tokens, eot_id)
        host = lengths.tolist() if isinstance(lengths, torch.Tensor) else [int(n) for n in lengths]
        if len(host) != b:
            raise ValueError(f"{len(host)} caption lengths for {b} captions")
        if host and not all(1 <= n <= context for n in host):
            raise ValueError(f"caption lengths must be in 1..{context}, got {min(host)}..{max(host)}")
        seqs = list(host)
        real = sum(host)
        total = math.ceil(real / multiple) * multiple if multiple > 1 else real
        fill = total - real
        while fill:  # filler captions, none longer than the context (positions stay in range)
            seqs.append(min(fill, context))
            fill -= seqs[-1]
        lens = torch.tensor(seqs, dtype=torch.int64)
        starts = torch.cumsum(lens, 0) - lens
        positions = torch.arange(total) - torch.repeat_interleave(starts, lens)
        rows = torch.repeat_interleave(torch.arange(len(seqs)), lens)
        gather = torch.where(rows < b, rows * context + positions, torch.zeros_like(rows))
        dev = tokens.device
        return cls(
            lengths=host,
            seqlens=seqs,
            context=context,
            total=total,
            gather=gather.to(dev, non_blocking=True),
            positions=positions.to(dev, non_blocking=True),
            pool=(starts[:b] + lens[:b] - 1).to(dev, non_blocking=True),
            starts=starts[:b].to(dev, non_blocking=True),
        )

    def packed_index(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat padded indices ``b * L + p`` (p < the caption's length) -> packed rows."""
        return self.starts[flat // self.context] + flat % self.context

    def unpack(self, rows: torch.Tensor) -> torch.Tensor:
        """Packed rows ``[total, W]`` -> padded ``[B, L, W]``, zeros past each caption's end."""
        b, width = len(self.lengths), rows.shape[-1]
        real = sum(self.lengths)
        out = rows.new_zeros(b * self.context, width)
        out = out.index_copy(0, self.gather[:real], rows[:real])
        return out.view(b, self.context, width)

    # -- attention layouts (built once per plan, shared by every layer) ----------------------------

    def buckets(self) -> tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]:
        """SDPA fallback: ``([(count, length), ...], to_buckets, from_buckets)``. ``to_buckets``
        lists, bucket after bucket, the packed row of each (caption, position) slot (padding slots
        read row 0); ``from_buckets`` gives each packed row's slot."""
        if "buckets" not in self._cache:
            # Host arithmetic on the host lengths: no tensor values read (no device sync).
            seqs = self.seqlens
            padded = [min(-(-n // BUCKET) * BUCKET, self.context) for n in seqs]
            order = sorted(range(len(seqs)), key=padded.__getitem__)
            shape: list[tuple[int, int]] = []
            for i in order:
                if shape and shape[-1][1] == padded[i]:
                    shape[-1] = (shape[-1][0] + 1, padded[i])
                else:
                    shape.append((1, padded[i]))
            slots = torch.tensor([padded[i] for i in order], dtype=torch.int64)
            order_t = torch.tensor(order, dtype=torch.int64)
            lens = torch.tensor(seqs, dtype=torch.int64)
            starts = torch.cumsum(lens, 0) - lens
            caption = torch.repeat_interleave(order_t, slots)
            first_slot = torch.cumsum(slots, 0) - slots
            p = torch.arange(sum(padded)) - torch.repeat_interleave(first_slot, slots)
            valid = p < lens[caption]
            to_rows = torch.where(valid, starts[caption] + p, torch.zeros_like(p))
            from_rows = torch.empty(self.total, dtype=torch.int64)
            from_rows[to_rows[valid]] = torch.arange(len(p))[valid]
            dev = self.gather.device
            self._cache["buckets"] = (
                shape,
                to_rows.to(dev, non_blocking=True),
                from_rows.to(dev, non_blocking=True),
            )
        return self._cache["buckets"]

    def xformers_bias(self, device: torch.device):
        """xformers' ``BlockDiagonalCausalMask`` over the packed sequences."""
        if "xformers" not in self._cache:
            from xformers.ops import fmha  # lazy: only on the xformers path

            mask = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(self.seqlens, device=device)
            self._cache["xformers"] = mask
        return self._cache["xformers"]


def packed_attention(q, k, v, plan: PackPlan, backend: str) -> torch.Tensor:
    """Block-diagonal causal attention over packed ``[1, T, H, D]`` q, k, v (``backend`` already
    resolved: ``"xformers"`` or ``"sdpa"``); returns ``[1, T, H, D]``."""
    if backend == "xformers":
        import xformers.ops as xops  # lazy: never at import time

        return xops.memory_efficient_attention(q, k, v, attn_bias=plan.xformers_bias(q.device))
    shape, to_buckets, from_buckets = plan.buckets()
    qkv = torch.stack((q[0], k[0], v[0]), dim=1).index_select(0, to_buckets)  # [slots, 3, H, D]
    outs, at = [], 0
    for count, length in shape:
        part = qkv[at : at + count * length].view(count, length, 3, *qkv.shape[2:])
        at += count * length
        qb, kb, vb = (t.transpose(1, 2) for t in part.unbind(2))  # BHSD views
        out = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
        outs.append(out.transpose(1, 2).reshape(count * length, *qkv.shape[2:]))
    return torch.cat(outs).index_select(0, from_buckets).unsqueeze(0)

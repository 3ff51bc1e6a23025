"""Multi-head attention: one function, two backends, and the module the towers use.

``attention(q, k, v, causal=..., backend=...)`` is the only place an attention backend is picked:

- ``"xformers"``: ``xformers.ops.memory_efficient_attention``. CUDA only (xformers ships no CPU
  kernels) and imported lazily, inside the call, so importing this module never imports it.
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient /
  cuDNN / math kernels, chosen by PyTorch for the tensors at hand; any device).
- ``"auto"``: xformers when it is importable AND the tensors are CUDA, SDPA otherwise.

Layouts. The function takes and returns **BSHD** tensors ``[batch, seq, heads, head_dim]``: what
a fused qkv projection gives with a free ``view`` (no copy), and xformers' native layout (it calls
it BMHK). SDPA wants **BHSD** ``[batch, heads, seq, head_dim]``; the SDPA branch passes
``transpose(1, 2)`` views (strided, last dim contiguous, which every SDPA kernel accepts) and
transposes the result back. The flash kernel writes its output in BSHD memory order, so on CUDA
the final ``reshape(B, L, W)`` is usually free.

Causal masking never builds an L x L tensor: SDPA gets ``is_causal=True``, xformers a
``LowerTriangularMask`` (both are top-left aligned; the towers only use square self-attention).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from declip_fast.models.packing import PackPlan, packed_attention

Backend = Literal["auto", "xformers", "sdpa"]
BACKENDS = ("auto", "xformers", "sdpa")

_XFORMERS_STATE: dict[str, bool] = {}


def xformers_available() -> bool:
    """True when ``xformers.ops`` imports (checked once; a constant under torch.compile)."""
    if "ok" not in _XFORMERS_STATE:
        try:
            import xformers.ops  # noqa: F401
        except Exception:  # ImportError, or a CUDA extension built for another torch
            _XFORMERS_STATE["ok"] = False
        else:
            _XFORMERS_STATE["ok"] = True
    return _XFORMERS_STATE["ok"]


# What torch.compiler.assume_constant_result sets: dynamo calls the function once while tracing and
# bakes in the answer instead of tracing an import. Set by hand because the decorator imports
# torch._dynamo (~2 s), and importing this module must stay cheap.
xformers_available._dynamo_marked_constant = True  # type: ignore[attr-defined]


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The one dispatch point: the concrete backend (``"xformers"`` or ``"sdpa"``) for ``q``."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "xformers" if q.is_cuda and xformers_available() else "sdpa"
    if backend == "xformers":
        if not q.is_cuda:
            raise ValueError(f"backend='xformers' needs CUDA tensors (no CPU kernels), got {q.device}")
        if not xformers_available():
            raise ImportError("backend='xformers' but xformers is not importable; use 'sdpa' or 'auto'")
    return backend


def _xformers_attention(q, k, v, causal: bool, dropout_p: float, scale: float | None):
    import xformers.ops as xops  # lazy: never at import time

    # xformers takes BMHK == BSHD as it is: no transposes.
    bias = xops.LowerTriangularMask() if causal else None
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout_p, scale=scale)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    backend: Backend = "auto",
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v over BSHD tensors; returns ``[B, Lq, H, D]``.

    ``scale`` defaults to ``1 / sqrt(head_dim)`` (both backends). ``k``/``v`` may be longer than
    ``q`` (attention pooling uses one query against all tokens).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D [batch, seq, heads, head_dim], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if resolve_backend(backend, q) == "xformers":
        return _xformers_attention(q, k, v, causal, dropout_p, scale)
    # SDPA: BSHD -> BHSD views in, BHSD out -> BSHD view back.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        dropout_p=dropout_p,
        is_causal=causal,
        scale=scale,
    )
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Self-attention with a fused qkv projection, parameter-compatible with nn.MultiheadAttention.

    ``in_proj_weight [3W, W]``, ``in_proj_bias [3W]`` (rows q, k, v) and ``out_proj`` carry
    nn.MultiheadAttention's names and layout, so OpenCLIP's ``attn.*`` weights load unchanged.
    Input and output are batch-first ``[B, L, W]``.
    """

    def __init__(self, dim: int, num_heads: int, *, causal: bool = False, backend: Backend = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.causal = causal
        self.backend = backend
        self._packed_attention = packed_attention  # before_compile() keeps it out of the graph
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.MultiheadAttention's initialisation; the Transformer overrides it with CLIP's.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, plan: PackPlan | None = None) -> torch.Tensor:
        """``x [B, L, W]``; with ``plan``, ``x`` is packed captions ``[1, T, W]`` and attention is
        block-diagonal causal over them (``declip_fast.models.packing``)."""
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        # [B, L, 3W] -> [B, L, 3, H, D]: q, k, v are BSHD views of one buffer.
        q, k, v = qkv.view(b, n, 3, self.num_heads, self.head_dim).unbind(2)
        if plan is not None:
            if not self.causal:
                raise ValueError("packed sequences need causal attention (the text tower's)")
            out = self._packed_attention(q, k, v, plan, resolve_backend(self.backend, q))
        else:
            out = attention(q, k, v, causal=self.causal, backend=self.backend)
        return self.out_proj(out.reshape(b, n, w))

    def before_compile(self) -> None:
        """Called by ``distributed.fsdp.parallelize`` before it compiles the blocks: the packed
        attention runs eagerly (a graph break), so the compiled graphs do not specialise on each
        batch's caption lengths (the bucket shapes, xformers' block mask)."""
        self._packed_attention = torch.compiler.disable(packed_attention)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, causal={self.causal}, backend={self.backend!r}"

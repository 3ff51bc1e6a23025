"""Fused SigLIP loss in Triton: the B x N logits never leave the chip, gradients in the forward.

``siglip_loss(image, text, logit_scale, logit_bias, offset=0)`` is
``(1/B) sum_{i<B, j<N} softplus(-y_ij z_ij)`` with ``z_ij = s * image_i . text_j + bias`` and
``y_ij = +1`` iff ``offset`` is not None and ``j == offset + i``, else -1 (``offset`` None: a
chunk of another rank's texts, no positives; ``offset = r * B``: this rank's images against the
gathered texts). ``kernels/reference_siglip.py`` is the plain-torch twin.

Design. A logit's gradient depends on that logit alone (``dz = sigmoid(z) - [y = +1]``), so unlike
the contrastive loss there is no statistics pass: when any input needs a gradient, the autograd
Function's forward runs two owner passes (the ``@triton.jit`` kernel and its tiles are in
``siglip_jit``). The row pass owns BP images and a BD chunk of D, walks every text block (or one
of S ranges of them), accumulates d image in registers and leaves d-scale (``sum dz * a.b``) and
d-bias (``sum dz``) partials; the column pass owns texts the same way and leaves d text and the
loss partials (the two epilogues split so that neither pass carries both). Every gradient element
(or fp32 split partial) is written once by its owner and the host sums the partials in a fixed
order: bit-identical across runs and program orders, no atomics. The gradients wait in fp32 for
the backward, which multiplies them by the upstream gradient and casts them to the inputs' dtypes
(an fp16 gradient of a mean loss would be subnormal before GradScaler's factor arrived). Only
what is needed runs: the column pass always (the loss; its gradient dot only for d text), the
row pass for d image, d scale or d bias (its dot only for d image); under ``torch.no_grad`` or
with no input requiring a gradient, the loss pass alone.

Budget per call (B images, N texts, width D, e bytes an input element, chunks = ceil(D / BD)):

- FLOPs (matrix products, 2 per multiply-add): loss only ``2 B N D``; with gradients each pass
  recomputes the logits (``chunks * 2 B N D``) and runs its gradient dot (``2 B N D``):
  ``8 B N D`` (4 B N D multiply-adds: 2 passes x (logits + gradient dot)) when a chunk covers D,
  against 6 B N D for the dense torch forward and backward. Hopper BD is 256 (8 warps) or 128
  (16 warps): at D = 512, 12 or 20 B N D.
- Per logit and pass: one exp2 (SFU), two fp32 divisions and ~20 FMAs (sigmoid; the softplus's
  log1p series in the column pass).
- HBM bytes, a lower bound: the inputs once per pass, ``(B + N) D e`` each; the fp32 gradients
  written once and read back by the backward, ``2 (B + N) D 4``, and the backward's gradients in
  the inputs' dtype, ``(B + N) D e``: 0.47 GB at B = N = 32768, D = 512, bf16. Split partials
  ``S P D 4`` (at most SPLIT_WORKSPACE_BYTES) and ``3 S ceil(P / 64)`` scalar partials.
- L2 bytes: per tile and chunk the K-loop streams ``(BP + BQ) D e`` and the gradient dot another
  ``BQ BD e``: at B = N = 32768, D = 512, bf16 and 64 x 64 tiles (BD 256), 38 FLOPs a byte, 86 GB
  a pass, so 15.6 ms a pass at 5.5 TB/s of L2 against 3.3 ms of bf16 MMA (989 TFLOP/s): the
  passes are L2-bound, like the contrastive backward. The loss pass at 128 x 128: 64 FLOPs a
  byte, 3.1 ms.
- Atomics: 0. Extra memory until the backward: the fp32 gradients, ``(B + N) D 4`` bytes.
- Registers (sm_90, specialised as launched, contiguous, bf16, B = N = 32768, D = 512; every
  config and launch in ``benchmarks/sm90_siglip.py``, all without spills): row / column pass
  204 / 231 at 64 x 64 x 256 on 8 warps, 117 / 128 at 128 x 64 x 128 and 109 / 128 at
  64 x 128 x 128 on 16 warps; the loss pass 128 (128 x 128, 16 warps) and 166 (8 warps); fp32
  214 / 223 and 178. One program per SM each. GPU speed not measured yet.
"""

from __future__ import annotations

import torch
import triton
from torch.autograd.function import once_differentiable

from declip_fast.kernels.siglip_jit import (
    ANY_D_GRAD,  # noqa: F401
    DZ_SCALE,  # noqa: F401
    INTERPRETER,  # noqa: F401
    SIGLIP_GRAD as HOPPER_GRAD,  # noqa: F401
    SIGLIP_LOSS as HOPPER_LOSS,  # noqa: F401
    SIGLIP_SCALARS as HOPPER_SCALARS,  # noqa: F401
    SUB_ROWS,
    _grad_kernel,
    _loss_kernel,
    _scalars_kernel,
)
from declip_fast.kernels.tuning import (
    bucket,
    concurrent_programs,
    dot_precision,
    interpreting,
    launch_device,
    plan_splits,
)

# Owner blocks and splits are planned in tiles of PLAN_TILE rows (the largest BP / BQ); at most
# MAX_SPLITS ranges of the other axis, and SPLIT_WORKSPACE_BYTES of fp32 for their partials.
PLAN_TILE = 128
MAX_SPLITS = 32
SPLIT_WORKSPACE_BYTES = 64 << 20
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(image, text, scale, bias, offset) -> None:
    if image.dim() != 2 or text.dim() != 2 or image.shape[1] != text.shape[1] or 0 in image.shape + text.shape:
        raise ValueError(f"image {tuple(image.shape)} and text {tuple(text.shape)} must be non-empty [B, D] and [N, D]")
    if image.dtype not in DTYPES or text.dtype != image.dtype:
        raise ValueError(
            f"the Triton SigLIP kernel takes fp16, bf16 or fp32 image and text of one dtype, "
            f"got {image.dtype} and {text.dtype}"
        )
    devices = {t.device for t in (image, text, scale, bias)}
    if len(devices) != 1 or (image.device.type != "cuda" and not interpreting()):
        raise ValueError(f"image, text, scale and bias must be on one CUDA device, got {sorted(map(str, devices))}")
    if scale.numel() != 1 or bias.numel() != 1:
        raise ValueError(
            f"logit_scale and logit_bias must be scalars, got {tuple(scale.shape)} and {tuple(bias.shape)}"
        )
    b, n = image.shape[0], text.shape[0]
    if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= n - b):
        raise ValueError(
            f"offset {offset!r} puts the positives of {b} images outside the {n} texts: "
            f"need None or an int in [0, {n - b}]"
        )


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along D (the only builds the compile tests hold to no spills)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _scalar32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(1).to(torch.float32)


def _pass(p, q, scale32, bias32, shift: int, mult: float, loss: bool, sb: bool, grad: bool):
    """One launch over ``z = s * p @ q.T + bias`` (pairs with ``t - o == shift`` positive): the
    fp32 gradient of ``mult`` times the loss sum with respect to ``p`` (if ``grad``), and fp32
    [3] sums of the loss (if ``loss``), of ``dz * p.q`` and of ``dz`` (if ``sb``)."""
    n_p, n_q, d = p.shape[0], q.shape[0], p.shape[1]
    slots = concurrent_programs(p.device)
    splits = plan_splits(triton.cdiv(n_p, PLAN_TILE), triton.cdiv(n_q, PLAN_TILE), slots, MAX_SPLITS)
    if grad:
        splits = max(1, min(splits, SPLIT_WORKSPACE_BYTES // (4 * n_p * d)))
    f32 = dict(dtype=torch.float32, device=p.device)
    n_sub = triton.cdiv(n_p, SUB_ROWS)
    scalars = loss or sb
    parts = torch.empty((3, splits * n_sub), **f32) if scalars else None  # every slot written
    out = torch.empty((splits, n_p, d) if splits > 1 else (n_p, d), **f32) if grad else None
    kernel = _grad_kernel if grad else _loss_kernel if loss else _scalars_kernel
    grid = lambda meta: (triton.cdiv(n_p, meta["BP"]), triton.cdiv(d, meta["BD"]) if grad else 1, splits)
    with launch_device(p.device):
        kernel[grid](
            p,
            q,
            scale32,
            bias32,
            out if grad else parts,  # a valid pointer for the output a launch does not write
            parts if scalars else out,
            n_p,
            n_q,
            d,
            shift,
            bucket(n_p),
            bucket(n_q),
            n_sub,
            mult,
            p.stride(0),
            p.stride(1),
            q.stride(0),
            q.stride(1),
            n_p * d if splits > 1 else 0,
            LOSS=loss,
            SB=sb,
            GRAD=grad,
            PRECISION=dot_precision(p.dtype),
        )
    if grad and splits > 1:
        out = out.sum(dim=0)  # a fixed order: the same bits every run
    return out, (parts.sum(dim=1) if scalars else None)


def siglip_forward(image, text, scale, bias, offset, need_image: bool, need_text: bool, need_sb: bool):
    """(loss, d image, d text, (d scale, d bias) as an fp32 [2]), fp32, None where not needed.

    The column pass (texts owned) gives the loss and, if needed, d text; the row pass (images
    owned) runs when d image or d scale / d bias are needed. The loss and the d-scale/d-bias sums
    sit in different passes so that neither carries both epilogues (registers: siglip_jit)."""
    _check_inputs(image, text, scale, bias, offset)
    a, b = _unit_stride(image), _unit_stride(text)
    s32, bias32 = _scalar32(scale), _scalar32(bias)
    m, n = a.shape[0], b.shape[0]
    # offset None: a shift no pair reaches (t - o < Q in either pass).
    d_image = sb = None
    if need_image or need_sb:
        d_image, sums = _pass(a, b, s32, bias32, n if offset is None else offset, 1.0 / m, False, need_sb, need_image)
        sb = sums[1:] / m if need_sb else None
    d_text, sums = _pass(b, a, s32, bias32, m if offset is None else -offset, 1.0 / m, True, False, need_text)
    return sums[0] / m, d_image, d_text, sb  # the mean over images, rounded once


# ----------------------------------------------------------------------------- autograd


class _FusedSigLIP(torch.autograd.Function):
    """The loss in ``out_dtype`` (None: the inputs' dtype), computed in fp32; the gradients are
    taken in the forward, kept in fp32 and scaled by the upstream gradient in the backward."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, offset, out_dtype, grad_enabled):
        # needs_input_grad is set under torch.no_grad() too: nothing to take then.
        need = [n and grad_enabled for n in ctx.needs_input_grad]
        with torch.autocast(image.device.type, enabled=False):
            loss, d_image, d_text, d_sb = siglip_forward(
                image, text, scale, bias, offset, need[0], need[1], need[2] or need[3]
            )
        ctx.save_for_backward(d_image, d_text, d_sb)
        ctx.like = [(t.dtype, t.shape) for t in (image, text, scale, bias)]
        return loss.to(image.dtype if out_dtype is None else out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        d_image, d_text, d_sb = ctx.saved_tensors
        g = grad_loss.detach().to(torch.float32)
        grads = (d_image, d_text) + ((None, None) if d_sb is None else tuple(d_sb))
        out = [
            (x * g).to(dtype).reshape(shape) if need else None
            for x, need, (dtype, shape) in zip(grads, ctx.needs_input_grad, ctx.like)
        ]
        return (*out, None, None, None)


def siglip_loss(image, text, logit_scale, logit_bias, offset=0, *, out_dtype=None):
    """SigLIP's sigmoid loss, ``(1/B) sum_ij softplus(-y_ij (s image_i . text_j + bias))``:
    ``y_ij = +1`` iff ``j == offset + i`` (``0 <= offset <= N - B``; None: every pair negative).
    image [B, D], text [N, D] (CUDA; fp16, bf16 or fp32), scale and bias 0-d tensors."""
    return _FusedSigLIP.apply(image, text, logit_scale, logit_bias, offset, out_dtype, torch.is_grad_enabled())

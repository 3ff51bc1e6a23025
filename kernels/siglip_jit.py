"""The Triton kernel of the fused SigLIP loss (``@triton.jit``) and its tile configurations.

One kernel, :func:`_siglip_pass`, serves every launch of ``siglip``: an owner pass over the logits
``z[o, t] = s * p_o . q_t + bias`` of an owned side ``p`` [P, D] against the other side ``q``
[Q, D]. A program owns BP rows of ``p`` (and, with ``GRAD``, a BD-wide chunk of D) and walks the
column blocks of ``q`` (all of them, or one of S contiguous ranges). Per tile: a K-loop of
``tl.dot`` over D (fp32 accumulation, ``PRECISION`` from ``tuning.dot_precision``), then per logit
``e = exp(-|z|)`` (one ``exp2``), the label ``y = +1`` iff ``t - o == shift``, the logit's whole
gradient ``dz = sigmoid(z) - [y = +1]`` (no statistics pass), and by constexpr flags:

- ``LOSS``: the row sums of ``softplus(-y z) = max(-y z, 0) + log1p(e)``;
- ``SB``: the row sums of ``dz * p.q`` (d scale) and ``dz`` (d bias);
- ``GRAD``: ``acc += (dz * 2^14) @ q[:, chunk]`` in registers, written once at the end, scaled by
  ``s * mult / 2^14``: the gradient of ``mult`` times the loss sum for the owned rows.

Sums leave one partial per (range, 64 owned rows), a layout that does not depend on the config,
so every launch rewrites every slot (the autotuner's trial runs of other configs leave nothing
stale); the host sums them in a fixed order. The row pass (``p`` = images, shift = offset) takes
SB and d image, the column pass (``p`` = texts, shift = -offset) the loss and d text: neither
carries all three epilogues. ``offset`` None (no positives) is a shift no pair reaches. No
program reads what another wrote and each output element has one writer: the same bits in any
program order, no atomics.

Numerics. ``log1p(e)`` for ``e`` in [0, 1] is ``2 atanh(e / (2 + e))``, its odd series to t^15
(t <= 1/3: relative error under 2^-26), so its accuracy does not rest on a hardware ``log`` near
1 (``lg2.approx`` has an absolute, not relative, error bound there). ``sigmoid(u)`` is ``1/(1+e)``
or ``e/(1+e)`` by the sign of u, and a positive's ``dz = -sigmoid(-z)``: no cancellation.
``|dz| <= 1``, so ``dz * 2^14`` stays below fp16's 65504 and sigmoids down to 2^-28 stay normal
in fp16 (at SigLIP's initial bias of -10 the negatives' sigmoids are ~4.5e-5, subnormal in fp16
unscaled); the power of two is divided out in fp32. Offsets are int64, so N * D may pass 2^31.

Tiles: Hopper configs per launch kind (below; each carries ``maxnreg`` and builds for sm_90
without spills, held there by ``tests/kernels/test_siglip.py`` through
``benchmarks/sm90_siglip.py``). The gradient passes keep a [BP, BD] fp32 accumulator for the
whole walk, as the contrastive backward does; D wider than BD runs as chunks that each recompute
the logits. The interpreter gets one config with big tiles (its cost is per program and loop
iteration) and a BD of 256, so D = 300 in the CPU tests takes two chunks.
"""

from __future__ import annotations

import triton
import triton.language as tl

from declip_fast.kernels.contrastive_jit import _block, _logits_tile, _span
from declip_fast.kernels.tuning import interpreting, tuning

DZ_SCALE = 16384.0  # 2^14: |dz| <= 1, so the scaled 16-bit copy stays below fp16's 65504

# (meta-parameters, launch options) per input class and launch kind. BP owned rows, BQ rows of the
# other side a tile, BK the K-loop step, BD the owned chunk of D (unused without GRAD). In comments,
# the most registers over the sm_90 builds of the launches that use a config (specialised,
# contiguous, D = 512 / 1000 / 64, bf16 and fp16): one program of 8 or 16 warps per SM. The
# epilogue's elementwise work (one exp2, two divisions, the log1p series, row sums) keeps several
# logits-sized tiles live: 128-row gradient tiles on 8 warps spill (12-124 bytes at 232-240
# registers); on 16 warps (128 registers a thread) they fit, except at D = 1000 (dropped there, as
# for the contrastive backward).
SIGLIP_GRAD = {  # the row pass (d image + d scale/bias sums) and the column pass (d text + loss)
    "16-bit": [
        (dict(BP=64, BQ=64, BK=64, BD=256), dict(num_warps=8, num_stages=3, maxnreg=232)),  # 231
        (dict(BP=128, BQ=64, BK=64, BD=128), dict(num_warps=16, num_stages=2, maxnreg=128)),  # 128
        (dict(BP=64, BQ=128, BK=64, BD=128), dict(num_warps=16, num_stages=2, maxnreg=128)),  # 128
    ],
    "fp32": [(dict(BP=64, BQ=32, BK=16, BD=64), dict(num_warps=4, num_stages=2, maxnreg=240))],
}
SIGLIP_LOSS = {  # the loss alone, without gradients: the logits tile and one row sum
    "16-bit": [
        (dict(BP=128, BQ=128, BK=64, BD=16), dict(num_warps=16, num_stages=3, maxnreg=128)),  # 128
        (dict(BP=128, BQ=64, BK=64, BD=16), dict(num_warps=8, num_stages=3, maxnreg=232)),  # 167
        (dict(BP=64, BQ=128, BK=64, BD=16), dict(num_warps=8, num_stages=3, maxnreg=232)),  # 168
    ],
    "fp32": [(dict(BP=64, BQ=64, BK=16, BD=16), dict(num_warps=4, num_stages=3, maxnreg=240))],
}
# d scale and d bias without d image (a frozen image tower): two row sums; 128 x 128 spills.
SIGLIP_SCALARS = {"16-bit": SIGLIP_LOSS["16-bit"][1:], "fp32": SIGLIP_LOSS["fp32"]}
# The gradient configs that stay spill-free when D is not a multiple of 16 (no divisibility-hinted
# loads); the others are dropped for such D, as in the contrastive backward.
ANY_D_GRAD = [dict(BP=64, BQ=64, BK=64, BD=256), dict(BP=64, BQ=32, BK=16, BD=64)]
INTERPRETER = {"any": [(dict(BP=64, BQ=64, BK=128, BD=256), dict(num_warps=4, num_stages=1))]}
SUB_ROWS = 64  # the scalar partials get one slot per (range, SUB_ROWS owned rows)
assert all(
    m["BP"] % SUB_ROWS == 0
    for t in (SIGLIP_GRAD, SIGLIP_LOSS, SIGLIP_SCALARS, INTERPRETER)
    for v in t.values()
    for m, _ in v
)


def _narrow_chunk(meta: dict, args: dict) -> dict | None:
    """A D-chunk no wider than D (rounded up to 16); for D not a multiple of 16 only ANY_D_GRAD."""
    if args["D"] % 16 and meta not in ANY_D_GRAD and not interpreting():
        return None
    meta["BD"] = min(meta["BD"], max(16, triton.next_power_of_2(args["D"])))
    return meta


GRAD_CONFIGS, GRAD_PRUNE = tuning(INTERPRETER if interpreting() else SIGLIP_GRAD, "p_ptr", _narrow_chunk)
LOSS_CONFIGS, LOSS_PRUNE = tuning(INTERPRETER if interpreting() else SIGLIP_LOSS, "p_ptr")
SCALARS_CONFIGS, SCALARS_PRUNE = tuning(INTERPRETER if interpreting() else SIGLIP_SCALARS, "p_ptr")
KEY = ["P_BUCKET", "Q_BUCKET", "D", "LOSS", "SB", "GRAD"]


@triton.jit
def _log1p_unit(e):
    """log(1 + e) for e in [0, 1], to a few fp32 ulps: 2 atanh(t), t = e / (2 + e) <= 1/3."""
    t = e / (2.0 + e)
    t2 = t * t
    poly = 1.0 / 13.0 + t2 * (1.0 / 15.0)
    poly = 1.0 / 11.0 + t2 * poly
    poly = 1.0 / 9.0 + t2 * poly
    poly = 1.0 / 7.0 + t2 * poly
    poly = 1.0 / 5.0 + t2 * poly
    poly = 1.0 / 3.0 + t2 * poly
    return 2.0 * t * (1.0 + t2 * poly)


@triton.jit
def _siglip_pass(
    # pointers: owned side p [P, D], other side q [Q, D], scale and bias (fp32 [1] each)
    p_ptr,
    q_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    part_ptr,
    # shapes
    P,
    Q,
    D,
    shift,
    P_BUCKET,
    Q_BUCKET,
    n_sub,
    mult,
    # strides (out is [S, P, D] fp32 partials, or the [P, D] gradient itself when S == 1)
    stride_pp,
    stride_pd,
    stride_qq,
    stride_qd,
    stride_out_split,
    # constexprs
    LOSS: tl.constexpr,
    SB: tl.constexpr,
    GRAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BP: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
):
    """Partials into ``part_ptr`` [3, S, n_sub] of the loss (``LOSS``, row 0), d scale and d bias
    (``SB``, rows 1 and 2), and the owned side's gradient times ``mult`` (``GRAD``); pairs with
    ``t - o == shift`` are positive."""
    pid_p = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    qb_start, qb_end = _span(pid_s, tl.num_programs(2), tl.cdiv(Q, BQ))
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    own = pid_p * BP + tl.arange(0, BP)
    omask = own < P
    dd = pid_d * BD + tl.arange(0, BD)
    acc = tl.zeros((BP, BD), tl.float32)
    loss = tl.zeros((BP,), tl.float32)
    ds = tl.zeros((BP,), tl.float32)
    db = tl.zeros((BP,), tl.float32)
    for qb in range(qb_start, qb_end):
        oth = qb * BQ + tl.arange(0, BQ)
        valid = omask[:, None] & (oth < Q)[None, :]
        # The raw products p.q (scale 1); entries past the edges are -inf there, 0 here.
        x = _logits_tile(
            p_ptr,
            q_ptr,
            pid_p * BP,
            qb * BQ,
            P,
            Q,
            D,
            stride_pp,
            stride_pd,
            stride_qq,
            stride_qd,
            1.0,
            BP,
            BQ,
            BK,
            PRECISION,
        )
        x = tl.where(valid, x, 0.0)
        z = scale * x + bias
        is_pos = oth[None, :] - own[:, None] == shift
        u = tl.where(is_pos, -z, z)  # the loss is softplus(u); its gradient in z is +-sigmoid(u)
        e = tl.exp2(tl.abs(z) * -1.4426950408889634)  # exp(-|z|) = exp(-|u|)
        r = 1.0 / (1.0 + e)
        sig = tl.where(u >= 0, r, e * r)
        dz = tl.where(valid, tl.where(is_pos, -sig, sig), 0.0)
        if LOSS:
            loss += tl.sum(tl.where(valid, tl.maximum(u, 0.0) + _log1p_unit(e), 0.0), axis=1)
        if SB:
            ds += tl.sum(dz * x, axis=1)
            db += tl.sum(dz, axis=1)
        if GRAD:
            q_blk = tl.advance(_block(q_ptr, qb * BQ, Q, D, stride_qq, stride_qd, BQ, BD), (0, pid_d * BD))
            q = tl.load(q_blk, boundary_check=(0, 1), padding_option="zero")
            # DZ_SCALE (2^14), literal here: a jit function reads no module globals.
            acc = tl.dot((dz * 16384.0).to(p_ptr.dtype.element_ty), q, acc, input_precision=PRECISION)
    if GRAD:
        own64 = own.to(tl.int64)
        out = out_ptr + pid_s.to(tl.int64) * stride_out_split + own64[:, None] * D + dd[None, :]
        tl.store(out, acc * (scale * mult / 16384.0), mask=omask[:, None] & (dd < D)[None, :])
    if LOSS or SB:
        # One slot per (range, 64 owned rows), the same layout whatever the config's BP, so every
        # launch rewrites every slot (the autotuner's trial runs leave nothing stale); written by
        # the chunk-0 program alone. SUB_ROWS (64), literal here.
        sub = pid_p * (BP // 64) + tl.arange(0, BP // 64)
        slot = pid_s * n_sub + sub
        keep = (sub < n_sub) & (pid_d == 0)
        n_slots = n_sub * tl.num_programs(2)
        if LOSS:
            tl.store(part_ptr + slot, tl.sum(tl.reshape(loss, (BP // 64, 64)), axis=1), mask=keep)
        if SB:
            tl.store(part_ptr + n_slots + slot, tl.sum(tl.reshape(ds, (BP // 64, 64)), axis=1), mask=keep)
            tl.store(part_ptr + 2 * n_slots + slot, tl.sum(tl.reshape(db, (BP // 64, 64)), axis=1), mask=keep)


_grad_kernel = triton.autotune(configs=GRAD_CONFIGS, key=KEY, prune_configs_by=GRAD_PRUNE)(_siglip_pass)
_loss_kernel = triton.autotune(configs=LOSS_CONFIGS, key=KEY, prune_configs_by=LOSS_PRUNE)(_siglip_pass)
_scalars_kernel = triton.autotune(configs=SCALARS_CONFIGS, key=KEY, prune_configs_by=SCALARS_PRUNE)(_siglip_pass)

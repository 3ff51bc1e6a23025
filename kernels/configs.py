"""Tile configurations of the Triton kernels, and why they are what they are.

Each kernel autotunes over a short list per input class ("16-bit" or "fp32", see
``tuning.input_class``); the interpreter (CPU tests) gets one config with big tiles, since its cost
is per program and loop iteration almost whatever the tile, and, for the contrastive backward, a BD
narrower than the widest test D so that the D-chunk walk runs on the CPU too. Every Hopper config
builds for sm_90, specialised as a real launch is, without spills and within 240 registers
(``tests/kernels/test_sm90_compile.py``); ``benchmarks/kernel_budget.py`` prints each one's FLOPs,
bytes, registers, programs per SM and roofline bound.

Contrastive loss (reasoning from the sm_90 builds; not yet timed on a GPU). ptxas left alone
takes every register up to 255 (no occupancy target), so each config carries ``maxnreg`` (232,
240 for fp32) and the compile test holds each specialised build to no spills. Forward: a GEMM whose epilogue
per tile is two max/sum reductions and ~2 exp2 per logit; 128 x 64 tiles on two warpgroups
(BK = 64, 3 stages: 228 registers, 72 KiB shared at D = 512) and 64 x 128 on one; 128 x 128 spills
even at 240 registers, because the logits tile lives twice (values and exponentials). At ~230
registers x 256 threads one program fits per SM, so grids are planned in whole waves of one
program per SM. Backward: the owner accumulator ``[BP, BD]`` fp32 stays in registers for the
whole walk; 64 x 256 on two warpgroups builds at 204 registers, 64 x 512 spills (392 bytes at
240), so D = 512 runs as two chunks that each recompute the logits: 14 N^2 D per loss step
instead of 10, accepted over spilling an accumulator that every tile updates. What bounds it:
each tile's K-loop streams (BM + BN) x D operands from L2, 43 FLOPs a byte at 128 x 64 in 16
bits, so the kernels are L2-bound before they are MMA-bound: ``benchmarks/kernel_budget.py``
puts the loss step (14 N^2 D at N = 32768, D = 512, bf16) at 22% of bf16 peak for an L2 of
5.5 TB/s (a PCIe H100's measured figure) and 47% at 12 TB/s. The design aims at ~40%: L2 near
the upper figure on an SXM H100, wgmma from one or two warpgroups without FlashAttention-3's
ping-pong scheduling (the exp2 epilogue is not hidden), and half the backward's FLOPs (two
thirds at D = 512) recomputing logits. The levers a GPU run will rank: 128 x 128 forward tiles
(fewer L2 bytes per FLOP; today they spill, the logits tile lives twice), a D-resident operand
in shared memory, and whole-D accumulators once registers allow.

Lookup: a plain GEMM with a row-maximum epilogue (no exponentials), so the large 128 x 128 tiles
fit (214-220 registers) and give the most FLOPs per L2 byte; 128 x 64 and 64 x 64 remain for
banks and batches too small to fill the GPU with them.
"""

# Contrastive forward (``BM`` x ``BN`` logits tiles, ``BK`` the K-loop step).
CONTRASTIVE_FWD = {
    "16-bit": [
        (dict(BM=128, BN=64, BK=64), dict(num_warps=8, num_stages=3, maxnreg=232)),
        (dict(BM=64, BN=128, BK=64), dict(num_warps=4, num_stages=3, maxnreg=232)),
        (dict(BM=128, BN=64, BK=32), dict(num_warps=8, num_stages=4, maxnreg=232)),
    ],
    "fp32": [(dict(BM=64, BN=64, BK=16), dict(num_warps=4, num_stages=3, maxnreg=240))],
}
# Contrastive backward owner passes (``BP`` owned rows, ``BQ`` rows of the other side a tile,
# ``BK`` the logits' K-loop step, ``BD`` the owned chunk of D held in registers).
CONTRASTIVE_BWD = {
    "16-bit": [
        (dict(BP=64, BQ=64, BK=64, BD=256), dict(num_warps=8, num_stages=3, maxnreg=232)),
        (dict(BP=128, BQ=64, BK=64, BD=128), dict(num_warps=8, num_stages=2, maxnreg=232)),
        (dict(BP=64, BQ=128, BK=64, BD=128), dict(num_warps=8, num_stages=2, maxnreg=232)),
    ],
    "fp32": [(dict(BP=64, BQ=32, BK=16, BD=64), dict(num_warps=4, num_stages=2, maxnreg=240))],
}
# The backward configs that stay spill-free when D is not a multiple of 16 (no vectorised,
# divisibility-hinted loads): the others are dropped for such D.
ANY_D_BWD = [dict(BP=64, BQ=64, BK=64, BD=256), dict(BP=64, BQ=32, BK=16, BD=64)]
INTERPRETER_FWD = {"any": [(dict(BM=64, BN=64, BK=128), dict(num_warps=4, num_stages=1))]}
INTERPRETER_BWD = {"any": [(dict(BP=64, BQ=64, BK=128, BD=256), dict(num_warps=4, num_stages=1))]}

# Top-1 lookup (``BM`` queries x ``BN`` bank rows a tile).
LOOKUP = {
    "16-bit": [
        (dict(BM=128, BN=128, BK=64), dict(num_warps=8, num_stages=3, maxnreg=232)),
        (dict(BM=128, BN=128, BK=64), dict(num_warps=8, num_stages=4, maxnreg=232)),
        (dict(BM=128, BN=64, BK=64), dict(num_warps=4, num_stages=3, maxnreg=232)),
        (dict(BM=64, BN=64, BK=64), dict(num_warps=4, num_stages=4, maxnreg=232)),
    ],
    "fp32": [
        (dict(BM=64, BN=64, BK=16), dict(num_warps=4, num_stages=3, maxnreg=232)),
        (dict(BM=64, BN=32, BK=32), dict(num_warps=4, num_stages=3, maxnreg=232)),
    ],
}
LOOKUP_INTERPRETER = {"any": [(dict(BM=64, BN=64, BK=128), dict(num_warps=4, num_stages=1))]}

"""sm_90 build specs of the fused SigLIP kernel (``kernels/siglip_jit.py``), for
:func:`benchmarks.sm90.compile_sm90` and :func:`benchmarks.sm90.hopper_problems`.

    python -m benchmarks.sm90_siglip [--b B] [--n N] [--d D] [--dtype bfloat16|float16|float32]

prints registers, spills and shared memory of every Hopper config of the four launches (the
row pass: d image, d scale, d bias; the column pass: the loss and d text; loss only; d scale and
d bias only),
each specialised as a launch with contiguous inputs at those shapes is. Kept apart from
``benchmarks/sm90.py`` (which :func:`siglip_specs` uses, not extends), following its
``contrastive_specs``.
"""

from __future__ import annotations

import argparse
import importlib

from benchmarks.sm90 import _T, _bucket, _input_class, _precision, _spec, compile_sm90

MODULE = "declip_fast.kernels.siglip_jit"
# (launch, kernel, owns the texts, LOSS, SB, GRAD): the launches siglip.py makes. Training runs
# "rows" (d image, d scale, d bias) and "columns" (loss, d text); without gradients only "loss";
# "scalars" when d scale or d bias is needed without d image.
LAUNCHES = [
    ("rows", "_grad_kernel", False, False, True, True),
    ("columns", "_grad_kernel", True, True, False, True),
    ("loss", "_loss_kernel", True, True, False, False),
    ("scalars", "_scalars_kernel", False, False, True, False),
]


def siglip_specs(b: int, n: int, d: int, dtype: str, specialized: bool = True) -> list[dict]:
    """Every Hopper config of every launch for ``b`` images against ``n`` texts of width ``d``
    in ``dtype`` ("bfloat16", "float16", "float32"), each spec tagged with ``config`` (its
    meta-parameters) and ``launch`` (see LAUNCHES; "columns" and "loss" own the ``n`` texts)."""
    mod = importlib.import_module(MODULE)
    t = _T[dtype]
    types = dict(
        p_ptr=t,
        q_ptr=t,
        scale_ptr="*fp32",
        bias_ptr="*fp32",
        out_ptr="*fp32",
        part_ptr="*fp32",
        P="i32",
        Q="i32",
        D="i32",
        shift="i32",
        P_BUCKET="i32",
        Q_BUCKET="i32",
        n_sub="i32",
        mult="fp32",
        stride_pp="i32",
        stride_pd="i32",
        stride_qq="i32",
        stride_qd="i32",
        stride_out_split="i32",
    )
    specs = []
    for launch, kernel, texts, loss, sb, grad in LAUNCHES:
        p, q = (n, b) if texts else (b, n)
        values = dict(
            P=p,
            Q=q,
            D=d,
            shift=0,
            P_BUCKET=_bucket(p),
            Q_BUCKET=_bucket(q),
            n_sub=-(-p // mod.SUB_ROWS),
            stride_pp=d,
            stride_pd=1,
            stride_qq=d,
            stride_qd=1,
            stride_out_split=0,
        )
        table = mod.SIGLIP_GRAD if grad else mod.SIGLIP_LOSS if loss else mod.SIGLIP_SCALARS
        for meta, opts in table[_input_class(dtype)]:
            if grad and d % 16 and meta not in mod.ANY_D_GRAD:
                continue  # the launcher drops it for such D (siglip_jit._narrow_chunk)
            if grad:
                meta = dict(meta, BD=min(meta["BD"], max(16, 1 << (d - 1).bit_length())))
            consts = dict(LOSS=loss, SB=sb, GRAD=grad, PRECISION=_precision(dtype), **meta)
            spec = _spec(MODULE, kernel, types, values, consts, opts, specialized)
            specs.append(dict(spec, config=meta, launch=launch))
    return specs


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--b", type=int, default=32768)
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_T))
    args = parser.parse_args()
    specs = siglip_specs(args.b, args.n, args.d, args.dtype)
    for spec, res in zip(specs, compile_sm90(specs)):
        print(
            f"{spec['launch']:8s} {spec['config']} warps={spec['num_warps']} stages={spec['num_stages']}: "
            f"{res.registers} registers, {res.spills} spill bytes, {res.shared} B shared, wgmma={res.has_wgmma}"
        )


if __name__ == "__main__":
    _main()

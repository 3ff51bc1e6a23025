"""The budget of every Triton kernel config at a problem size, and the H100 time it cannot beat.

    python -m benchmarks.kernel_budget [--n N] [--d D] [--dtype bfloat16|float16|float32]
        [--lookup-b B] [--lookup-m M] [--l2-tbs X] [--json PATH] [--no-compile]

GPU time is scarce, so a measured kernel time should arrive with the number it is held against.
For each kernel (the fused loss's forward, its two backward owner passes, the top-1 lookup) and
each of its Hopper autotune configs, this prints what the tiling costs (matrix-product FLOPs, exp2
evaluations, HBM and L2 bytes, atomics), how the config builds for sm_90 (registers, spills,
shared memory, programs per SM; ``--no-compile`` skips the build) and the roofline bound on an
H100 SXM; then the whole loss step (forward + both passes) at the best config of each kernel.

Counting, with N rows = N columns (the symmetric loss), e bytes per input element and
chunks = ceil(D / BD); FLOPs count matrix products only (2 m n k each):

- forward ``2 N^2 D``; each backward owner pass ``chunks * 2 N^2 D`` (every D-chunk recomputes the
  logits over the full D) ``+ 2 N^2 D`` (``dX @ q``, chunk widths summing to D); the lookup
  ``2 B M D``. A loss step is ``(2 + 4 (chunks + 1)) N^2 D`` (two passes of 2 (chunks + 1)):
  10 N^2 D when BD >= D, 14 at D = 512 with BD = 256.
- exp2: forward 2 per logit (row and column statistics), each pass 2 per logit per chunk; the
  O(N) merges of (max, sum) pairs are left out (under 2% at these tiles). The SFU can bind.
- HBM bytes, a lower bound: each input read once, each output written once, plus the forward's
  (P_r + P_c) x N fp32 (max, sum) partials and positives, the passes' O(N) statistics, and the
  lookup's S x B (score, index) partials. Host folds between kernels and the row pass's
  d-scale partials (N / 16 floats) are not counted.
- L2 bytes, every load and store an SM issues, none assumed to hit in L1: a logits tile's K-loop
  loads (BM + BN) D elements (rows past the edge are not loaded); a pass also loads, per tile and
  chunk, BQ x BD of q and 2 fp32 statistics per other row; the forward reads and rewrites its
  column partials per tile.
- atomics: none (every gradient element has one owner); for context, the atomic backward this
  design replaced issued one fp32 atomic per element of each tile's BM x D and BN x D
  contribution: ``N D ceil(N / BN) + N D ceil(N / BM)``.
- programs per SM = min(floor(65536 / (ceil(regs / 8) 8 * 32 warps)), floor(228 KiB /
  (shared + 1 KiB)), 32): registers go to warps in units of 256 (8 a thread), each resident
  program reserves 1 KiB of shared memory, an SM holds at most 32 programs. ``waves`` =
  programs / (132 x programs per SM), for context (a grid under one wave leaves SMs idle); it
  is not part of the bound.

Bound = max(FLOPs / peak, HBM bytes / HBM bandwidth, L2 bytes / L2 bandwidth, exp2 / SFU rate);
the resource that gives the max binds. H100 SXM figures (assumptions, not measured here): 132 SMs
at 1.83 GHz (the clock NVIDIA's dense peaks are quoted at); 989 TFLOP/s dense bf16/fp16
(``declip_fast.train.metrics.PEAK_BF16``, the trainer's MFU peak); fp32 inputs run tf32x3, three
TF32 products at half that rate, so 989 / 2 / 3; HBM3 3.35 TB/s; exp2 16 results / clock / SM
(the MUFU throughput the CUDA programming guide gives compute capability 9.0: 3.87 T/s, the
"3.9 TFLOPS of special functions" FlashAttention-3 cites); L2 5.5 TB/s, the rate microbenchmarks
report for an H100 PCIe (114 SMs). An SXM part may exceed it, so the L2 column is the least
certain one (``--l2-tbs`` changes it), and it matters: a tile that reloads its operands from L2
does 2 BM BN / ((BM + BN) e) FLOPs a byte, 43 for a 128 x 64 bf16 tile, i.e. ~235 TFLOP/s at
5.5 TB/s.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from declip_fast.train.metrics import PEAK_BF16

H100_SMS = 132
H100_CLOCK_HZ = 1.83e9
SFU_PER_CLOCK_PER_SM = 16
HBM_BYTES_PER_S = 3.35e12
L2_BYTES_PER_S = 5.5e12
REGISTERS_PER_SM = 65536
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED_PER_PROGRAM = 1024
MAX_PROGRAMS_PER_SM = 32
ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# (BM, BN) of the first Hopper backward config of the atomic design the owner passes replaced.
ATOMIC_DESIGN_TILE = (128, 64)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- counts: pure arithmetic on the problem and the tiling ----------------------------------


def forward_flops(m: int, n: int, d: int) -> int:
    return 2 * m * n * d


def owner_pass_flops(p: int, q: int, d: int, bd: int) -> int:
    """Each D-chunk recomputes the P x Q logits over the full D, then multiplies dX by its chunk."""
    return cdiv(d, bd) * 2 * p * q * d + 2 * p * q * d


def lookup_flops(b: int, m: int, d: int) -> int:
    return 2 * b * m * d


def forward_exp2(m: int, n: int, symmetric: bool = True) -> int:
    return (2 if symmetric else 1) * m * n


def owner_pass_exp2(p: int, q: int, d: int, bd: int, stats: int = 2) -> int:
    """``stats`` probabilities per logit (own and other side's for the symmetric loss), per chunk."""
    return stats * p * q * cdiv(d, bd)


def forward_bytes(m, n, d, e, bm, bn, p_r, p_c) -> tuple[int, int]:
    """(HBM, L2) bytes of the forward over P_r x P_c rectangles of BM x BN tiles. Each column
    partial is stored by every tile and loaded by all but the first row block of a rectangle."""
    out = 8 * (p_c * m + p_r * n) + 4 * m  # (max, sum) partials and the positives
    operands = d * e * (m * cdiv(n, bn) + n * cdiv(m, bm))
    column_rmw = 8 * n * cdiv(m, bm) + 8 * n * (cdiv(m, bm) - p_r)
    return (m + n) * d * e + out, operands + column_rmw + 8 * p_c * m + 4 * m


def owner_pass_bytes(p, q, d, e, bp, bq, bd, splits) -> tuple[int, int]:
    """(HBM, L2) bytes of one owner pass on a (P / BP) x chunks x S grid; the output is the
    gradient in the input dtype, or S fp32 partials when the other axis is split."""
    chunks, blocks = cdiv(d, bd), cdiv(p, bp)
    out = p * d * e if splits == 1 else splits * p * d * 4
    logits = chunks * d * e * (p * cdiv(q, bq) + q * blocks)
    stats = 8 * q * chunks * blocks + 8 * p * chunks * splits  # other side's per tile, own per program
    return (p + q) * d * e + 8 * (p + q) + out, logits + e * q * d * blocks + stats + out


def lookup_bytes(b, m, d, e, bm, bn, splits) -> tuple[int, int]:
    """(HBM, L2) bytes of the lookup: every split writes a (score fp32, index int64) per query."""
    out = 12 * splits * b
    return (b + m) * d * e + out, d * e * (b * cdiv(m, bn) + m * cdiv(b, bm)) + out


def atomic_design_atomics(m: int, n: int, d: int, bm: int, bn: int) -> int:
    """fp32 atomics of a one-pass backward that adds each tile's BM x D into dA, BN x D into dB."""
    return m * d * cdiv(n, bn) + n * d * cdiv(m, bm)


def programs_per_sm(registers: int, num_warps: int, shared: int) -> int:
    by_registers = REGISTERS_PER_SM // (cdiv(registers, 8) * 8 * 32 * num_warps)
    by_shared = SHARED_PER_SM // (shared + SHARED_RESERVED_PER_PROGRAM)
    return min(by_registers, by_shared, MAX_PROGRAMS_PER_SM)


# ---- the H100 roofline ------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    matmul: float  # FLOP/s
    hbm: float  # bytes/s
    l2: float  # bytes/s
    exp2: float  # results/s


def h100(dtype: str, l2: float = L2_BYTES_PER_S) -> Machine:
    """The H100 SXM peaks for inputs of ``dtype``: fp32 dots are three TF32 products at half rate."""
    matmul = PEAK_BF16["H100"] / (6 if dtype == "float32" else 1)
    return Machine(matmul, HBM_BYTES_PER_S, l2, H100_SMS * H100_CLOCK_HZ * SFU_PER_CLOCK_PER_SM)


def roofline(flops, hbm_bytes, l2_bytes, exp2, machine: Machine) -> tuple[dict, str, float]:
    """(seconds per resource, the binding resource, the bound: the largest of them)."""
    times = {
        "matmul": flops / machine.matmul,
        "HBM": hbm_bytes / machine.hbm,
        "L2": l2_bytes / machine.l2,
        "exp2": exp2 / machine.exp2,
    }
    binds = max(times, key=times.get)
    return times, binds, times[binds]


# ---- the rows: one per (kernel, config), from the specs the compile tests build --------------


def launch_plan(n: int, d: int, b: int, m: int) -> dict:
    """What the launchers pick on a 132-SM H100 (mirrors contrastive.forward_stats / _owner_pass
    and nn_lookup._splits with concurrent_programs = 132)."""
    from declip_fast.kernels import contrastive, nn_lookup
    from declip_fast.kernels.tuning import plan_rectangles, plan_splits

    tiles = cdiv(n, contrastive.PLAN_TILE)
    p_r, p_c = plan_rectangles(tiles, tiles, H100_SMS, contrastive.MAX_PROGRAMS_PER_AXIS)
    splits = plan_splits(tiles, tiles, H100_SMS, contrastive.MAX_SPLITS)
    splits = max(1, min(splits, contrastive.SPLIT_WORKSPACE_BYTES // (4 * n * d)))
    want = cdiv(H100_SMS * nn_lookup.PROGRAMS_PER_SM, cdiv(b, nn_lookup.SMALLEST_BM))
    lookup_splits = max(1, min(nn_lookup.MAX_SPLITS, want, cdiv(m, 128)))
    return dict(p_r=p_r, p_c=p_c, backward_splits=splits, lookup_splits=lookup_splits)


def _row(kernel: str, spec: dict, flops, exp2, traffic, programs) -> dict:
    meta = spec["config"]
    label = " ".join(f"{k}={v}" for k, v in meta.items())
    return dict(
        kernel=kernel,
        config=f"{label} w{spec['num_warps']} s{spec['num_stages']}",
        meta=meta,
        num_warps=spec["num_warps"],
        num_stages=spec["num_stages"],
        flops=flops,
        exp2=exp2,
        hbm_bytes=traffic[0],
        l2_bytes=traffic[1],
        atomics=0,
        programs=programs,
        spec=spec,
    )


def contrastive_rows(n: int, d: int, dtype: str, plan: dict) -> list[dict]:
    """Forward, row pass (dA, d scale) and column pass (dB) of the symmetric loss, per config."""
    from benchmarks.sm90 import contrastive_specs

    e, s = ELEMENT_BYTES[dtype], plan["backward_splits"]
    forward, rows, columns = [], [], []
    for spec in contrastive_specs(n, d, dtype):
        c = spec["config"]
        if spec["kernel"] == "_fwd_kernel":
            traffic = forward_bytes(n, n, d, e, c["BM"], c["BN"], plan["p_r"], plan["p_c"])
            forward.append(
                _row("forward", spec, forward_flops(n, n, d), forward_exp2(n, n), traffic, plan["p_r"] * plan["p_c"])
            )
            continue
        flops, exp2 = owner_pass_flops(n, n, d, c["BD"]), owner_pass_exp2(n, n, d, c["BD"])
        traffic = owner_pass_bytes(n, n, d, e, c["BP"], c["BQ"], c["BD"], s)
        programs = cdiv(n, c["BP"]) * cdiv(d, c["BD"]) * s
        rows.append(_row("backward rows", spec, flops, exp2, traffic, programs))
        # The column pass is the same kernel built without the d-scale sum.
        col = dict(spec, constexprs=dict(spec["constexprs"], WANT_DS=False))
        columns.append(_row("backward columns", col, flops, exp2, traffic, programs))
    return forward + rows + columns


def lookup_rows(b: int, m: int, d: int, dtype: str, plan: dict) -> list[dict]:
    from benchmarks.sm90 import lookup_specs

    e, s = ELEMENT_BYTES[dtype], plan["lookup_splits"]
    out = []
    for spec in lookup_specs(b, m, d, dtype):
        c = spec["config"]
        out.append(
            _row(
                "lookup",
                spec,
                lookup_flops(b, m, d),
                0,
                lookup_bytes(b, m, d, e, c["BM"], c["BN"], s),
                cdiv(b, c["BM"]) * s,
            )
        )
    return out


def add_roofline(rows: list[dict], machine: Machine) -> None:
    for row in rows:
        times, binds, bound = roofline(row["flops"], row["hbm_bytes"], row["l2_bytes"], row["exp2"], machine)
        rate = row["flops"] / bound
        row.update(times_s=times, binds=binds, bound_s=bound, tflops=rate / 1e12, of_peak=rate / machine.matmul)


def add_builds(rows: list[dict]) -> None:
    """sm_90 resources of every row, from one compile_sm90 call (one child process)."""
    from benchmarks.sm90 import compile_sm90

    for row, res in zip(rows, compile_sm90([row["spec"] for row in rows])):
        per_sm = programs_per_sm(res.registers, res.num_warps, res.shared)
        row.update(
            registers=res.registers,
            spill_bytes=res.spills,
            shared_bytes=res.shared,
            wgmma=res.has_wgmma,
            programs_per_sm=per_sm,
            waves=row["programs"] / (H100_SMS * per_sm) if per_sm else None,
        )


def best(rows: list[dict], kernel: str) -> dict:
    """The config of ``kernel`` with the lowest bound (the first listed on ties)."""
    return min((r for r in rows if r["kernel"] == kernel), key=lambda r: r["bound_s"])


def loss_step(rows: list[dict], n: int, d: int, machine: Machine) -> dict:
    """Forward + row pass + column pass, each at its best config, run one after the other."""
    parts = [best(rows, k) for k in ("forward", "backward rows", "backward columns")]
    flops, bound = sum(p["flops"] for p in parts), sum(p["bound_s"] for p in parts)
    return dict(
        configs={p["kernel"]: p["config"] for p in parts},
        flops=flops,
        flops_per_n2d=flops / (n * n * d),
        bound_s=bound,
        tflops=flops / bound / 1e12,
        of_peak=flops / bound / machine.matmul,
    )


# ---- output ------------------------------------------------------------------------------------

COUNT_COLUMNS = [
    ("kernel", lambda r: r["kernel"]),
    ("config", lambda r: r["config"]),
    ("TFLOP", lambda r: f"{r['flops'] / 1e12:.3f}"),
    ("exp2 (G)", lambda r: f"{r['exp2'] / 1e9:.2f}"),
    ("HBM (MB)", lambda r: f"{r['hbm_bytes'] / 1e6:.1f}"),
    ("L2 (GB)", lambda r: f"{r['l2_bytes'] / 1e9:.2f}"),
    ("atomics", lambda r: str(r["atomics"])),
    ("programs", lambda r: str(r["programs"])),
]
BUILD_COLUMNS = [
    ("regs", lambda r: str(r["registers"])),
    ("spill B", lambda r: str(r["spill_bytes"])),
    ("smem KiB", lambda r: f"{r['shared_bytes'] / 1024:.0f}"),
    ("warps", lambda r: str(r["num_warps"])),
    ("prog/SM", lambda r: str(r["programs_per_sm"])),
    ("waves", lambda r: "-" if r["waves"] is None else f"{r['waves']:.2f}"),
]
BOUND_COLUMNS = [
    *((f"{k} ms", lambda r, k=k: f"{r['times_s'][k] * 1e3:.3f}") for k in ("matmul", "HBM", "L2", "exp2")),
    ("bound ms", lambda r: f"{r['bound_s'] * 1e3:.3f}"),
    ("TFLOP/s", lambda r: f"{r['tflops']:.0f}"),
    ("of peak", lambda r: f"{r['of_peak']:.0%}"),
    ("binds", lambda r: r["binds"]),
]


def table(rows: list[dict], columns: list[tuple]) -> list[str]:
    cells = [[fn(r) for _, fn in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _) in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    return [
        line([h for h, _ in columns]),
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        *(line(c) for c in cells),
    ]


def text_report(args, plan: dict, machine: Machine, rows: list[dict], step: dict, built: bool) -> list[str]:
    n, d = args.n, args.d
    bound_title = (
        "sm_90 build and H100 roofline bound" if built else "H100 roofline bound (no sm_90 build: --no-compile)"
    )
    lines = [
        f"Kernel budget: symmetric contrastive loss N = {n}, D = {d}; lookup B = {args.lookup_b}, "
        f"M = {args.lookup_m}, D = {d}; {args.dtype}",
        f"Launch plan on 132 SMs: forward P_r x P_c = {plan['p_r']} x {plan['p_c']} rectangles, "
        f"backward S = {plan['backward_splits']}, lookup S = {plan['lookup_splits']} bank ranges",
        f"H100 SXM (assumed): matmul {machine.matmul / 1e12:.1f} TFLOP/s, "
        f"HBM {machine.hbm / 1e12:.2f} TB/s, L2 {machine.l2 / 1e12:.2f} TB/s, "
        f"exp2 {machine.exp2 / 1e12:.2f} T/s "
        f"({H100_SMS} SMs x {H100_CLOCK_HZ / 1e9:.2f} GHz x {SFU_PER_CLOCK_PER_SM}/clk)",
        "",
        "Counts per kernel and config",
        *table(rows, COUNT_COLUMNS),
        "",
        bound_title,
        *table(rows, COUNT_COLUMNS[:2] + (BUILD_COLUMNS if built else []) + BOUND_COLUMNS),
        "",
    ]
    bm, bn = ATOMIC_DESIGN_TILE
    lookup = best(rows, "lookup")
    return lines + [
        f"Atomics: 0 in every kernel; the atomic backward they replaced (BM={bm}, BN={bn}) issued "
        f"{atomic_design_atomics(n, n, d, bm, bn):.3e} fp32 atomics per backward.",
        f"Lookup at its best config ({lookup['config']}): bound {lookup['bound_s'] * 1e3:.3f} ms, "
        f"{lookup['tflops']:.0f} TFLOP/s = {lookup['of_peak']:.0%} of peak.",
        "Loss step (forward + both passes at the best configs: "
        + "; ".join(f"{k}: {v}" for k, v in step["configs"].items())
        + "):",
        f"  {step['flops'] / 1e12:.3f} TFLOP = {step['flops_per_n2d']:g} N^2 D, bound "
        f"{step['bound_s'] * 1e3:.3f} ms, {step['tflops']:.0f} TFLOP/s = {step['of_peak']:.0%} of peak",
    ]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_budget", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32768, help="rows = columns of the loss (default 32768)")
    parser.add_argument("--d", type=int, default=512, help="feature width (default 512)")
    parser.add_argument("--dtype", choices=list(ELEMENT_BYTES), default="bfloat16")
    parser.add_argument("--lookup-b", type=int, default=4096, help="lookup queries (default 4096)")
    parser.add_argument("--lookup-m", type=int, default=65536, help="lookup bank rows (default 65536)")
    parser.add_argument(
        "--l2-tbs", type=float, default=L2_BYTES_PER_S / 1e12, help="assumed L2 bandwidth in TB/s (default 5.5)"
    )
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    parser.add_argument("--no-compile", action="store_true", help="skip the sm_90 build columns (fast)")
    args = parser.parse_args(argv)
    if min(args.n, args.d, args.lookup_b, args.lookup_m) < 1 or args.l2_tbs <= 0:
        parser.error("sizes and the L2 bandwidth must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = launch_plan(args.n, args.d, args.lookup_b, args.lookup_m)
    machine = h100(args.dtype, args.l2_tbs * 1e12)
    rows = contrastive_rows(args.n, args.d, args.dtype, plan)
    rows += lookup_rows(args.lookup_b, args.lookup_m, args.d, args.dtype, plan)
    add_roofline(rows, machine)
    if not args.no_compile:
        add_builds(rows)
    step = loss_step(rows, args.n, args.d, machine)
    print("\n".join(text_report(args, plan, machine, rows, step, built=not args.no_compile)))
    if args.json:
        problem = {k: v for k, v in vars(args).items() if k not in ("json", "no_compile")}
        atomics = atomic_design_atomics(args.n, args.n, args.d, *ATOMIC_DESIGN_TILE)
        data = dict(
            problem=problem,
            plan=plan,
            machine=asdict(machine),
            rows=[{k: v for k, v in r.items() if k != "spec"} for r in rows],
            loss_step=step,
            atomic_design_atomics=atomics,
        )
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

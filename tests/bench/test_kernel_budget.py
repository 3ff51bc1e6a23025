"""benchmarks/kernel_budget.py: its closed-form counts equal what an explicit walk over the
kernels' tiles and programs adds up (the walks copy the kernels' loops: _span ranges, D-chunks,
bank splits, edges that are not loaded), its programs-per-SM formula matches hand arithmetic, its
roofline names the resource that binds, and the script prints a row per config."""

import json
import math

import pytest

from benchmarks import kernel_budget as kb
from declip_fast.kernels.tuning import plan_rectangles


def _span(pid, programs, blocks):
    """The kernels' contiguous share of ``blocks`` for program ``pid`` of ``programs``."""
    return range(pid * blocks // programs, (pid + 1) * blocks // programs)


def _extent(block, size, total):
    """Valid rows of block ``block`` of ``size`` along an axis of ``total``."""
    return min(size, total - block * size)


def _forward_walk(m, n, d, e, bm, bn, p_r, p_c):
    """FLOPs, exp2, L2 bytes of _fwd_kernel over its (P_r, P_c) grid, tile by tile (m rows,
    n columns, row i's positive in column i)."""
    flops = exp2 = l2 = 0
    for pid_r in range(p_r):
        rbs = _span(pid_r, p_r, kb.cdiv(m, bm))
        for pid_c in range(p_c):
            for rb in rbs:
                rv = _extent(rb, bm, m)
                for cb in _span(pid_c, p_c, kb.cdiv(n, bn)):
                    cv = _extent(cb, bn, n)
                    flops += 2 * rv * cv * d
                    exp2 += 2 * rv * cv
                    l2 += (rv + cv) * d * e  # the K-loop's operands
                    l2 += 8 * cv * (2 if rb > rbs[0] else 1)  # column partials: (load +) store
                    l2 += 4 * sum(cb * bn <= r < cb * bn + cv for r in range(rb * bm, rb * bm + rv))
                l2 += 8 * rv  # the row block's (max, sum) pair
    return flops, exp2, l2


@pytest.mark.parametrize(
    "m, n, bm, bn", [(300, 300, 128, 64), (300, 500, 64, 128), (512, 512, 128, 64), (200, 700, 128, 64)]
)
def test_forward_counts_match_the_tile_walk(m, n, bm, bn):
    d, e = 96, 2
    p_r, p_c = plan_rectangles(kb.cdiv(m, 128), kb.cdiv(n, 128), 4, 32)
    flops, exp2, l2 = _forward_walk(m, n, d, e, bm, bn, p_r, p_c)
    assert kb.forward_flops(m, n, d) == flops == 2 * m * n * d
    assert kb.forward_exp2(m, n) == exp2
    hbm, l2_closed = kb.forward_bytes(m, n, d, e, bm, bn, p_r, p_c)
    assert l2_closed == l2
    # HBM by hand: a and b once; P_c x M and P_r x N (max, sum) fp32 pairs; M fp32 positives.
    assert hbm == (m + n) * d * e + 8 * (p_c * m + p_r * n) + 4 * m


def _owner_walk(p, q, d, e, bp, bq, bd, splits):
    """FLOPs, exp2, L2 bytes of one _bwd_kernel pass over its (P / BP, chunks, S) grid."""
    flops = exp2 = l2 = 0
    out_bytes = e if splits == 1 else 4
    for pid_p in range(kb.cdiv(p, bp)):
        pv = _extent(pid_p, bp, p)
        for pid_d in range(kb.cdiv(d, bd)):
            width = _extent(pid_d, bd, d)
            for pid_s in range(splits):
                l2 += 8 * pv + pv * width * out_bytes  # own statistics; the gradient's store
                for qb in _span(pid_s, splits, kb.cdiv(q, bq)):
                    qv = _extent(qb, bq, q)
                    flops += 2 * pv * qv * d + 2 * pv * qv * width  # logits, then dX @ q-chunk
                    exp2 += 2 * pv * qv
                    l2 += (pv + qv) * d * e + qv * width * e + 8 * qv
    return flops, exp2, l2


@pytest.mark.parametrize(
    "p, q, d, bp, bq, bd, splits",
    [
        (300, 300, 80, 64, 64, 32, 1),  # three chunks, the last 16 wide; rows past the edge
        (300, 700, 80, 128, 64, 32, 3),  # split reduction: fp32 partials
        (256, 128, 64, 64, 128, 256, 1),  # one chunk wider than D
    ],
)
def test_owner_pass_counts_match_the_grid_walk(p, q, d, bp, bq, bd, splits):
    e = 2
    flops, exp2, l2 = _owner_walk(p, q, d, e, bp, bq, bd, splits)
    assert kb.owner_pass_flops(p, q, d, bd) == flops
    assert kb.owner_pass_exp2(p, q, d, bd) == exp2
    hbm, l2_closed = kb.owner_pass_bytes(p, q, d, e, bp, bq, bd, splits)
    assert l2_closed == l2
    out = p * d * e if splits == 1 else splits * p * d * 4
    assert hbm == (p + q) * d * e + 8 * (p + q) + out  # p, q, their (M, L) pairs, the output


def test_loss_step_flops_in_units_of_n2d():
    """Forward 2 N^2 D plus two passes of 2 (chunks + 1) N^2 D: 10 with one chunk, 14 with two."""
    n = 1024
    for d, bd, units in [(512, 256, 14), (512, 512, 10), (64, 256, 10), (512, 128, 22)]:
        total = kb.forward_flops(n, n, d) + 2 * kb.owner_pass_flops(n, n, d, bd)
        assert total == units * n * n * d


@pytest.mark.parametrize("b, m, bm, bn, splits", [(300, 1000, 128, 64, 3), (256, 4096, 64, 64, 7)])
def test_lookup_counts_match_the_grid_walk(b, m, bm, bn, splits):
    d, e = 48, 4
    flops = l2 = 0
    n_blocks = kb.cdiv(m, bn)
    per_split = kb.cdiv(n_blocks, splits)
    for pid_q in range(kb.cdiv(b, bm)):
        bv = _extent(pid_q, bm, b)
        for pid_s in range(splits):
            l2 += 12 * bv  # (score, index) per query of every split
            for cb in range(pid_s * per_split, min((pid_s + 1) * per_split, n_blocks)):
                kv = _extent(cb, bn, m)
                flops += 2 * bv * kv * d
                l2 += (bv + kv) * d * e
    assert kb.lookup_flops(b, m, d) == flops
    hbm, l2_closed = kb.lookup_bytes(b, m, d, e, bm, bn, splits)
    assert l2_closed == l2 and hbm == (b + m) * d * e + 12 * splits * b


def test_atomic_design_count_matches_the_tile_walk():
    """One fp32 atomic per element of each tile's BM x D (dA) and BN x D (dB) contribution."""
    m, n, d, bm, bn = 300, 200, 40, 128, 64
    walk = sum(
        (_extent(i, bm, m) + _extent(j, bn, n)) * d for i in range(kb.cdiv(m, bm)) for j in range(kb.cdiv(n, bn))
    )
    assert kb.atomic_design_atomics(m, n, d, bm, bn) == walk


@pytest.mark.parametrize(
    "registers, warps, shared, expected",
    [
        # 228 -> 232 a thread x 256 threads = 59392 of 65536 registers: 1 (shared alone allows 3)
        (228, 8, 73728, 1),
        # 96 x 128 = 12288: 5 by registers; 233472 // (16384 + 1024) = 13 by shared memory
        (96, 4, 16384, 5),
        # 97 rounds up to 104: 104 x 128 = 13312 -> 4 (unrounded, 12416 would give 5)
        (97, 4, 0, 4),
        # 32 x 128 = 4096 -> 16 by registers; 233472 // 101024 = 2 by shared memory
        (32, 4, 100000, 2),
        # two programs of 113.5 KiB fit in 228 KiB only without each one's 1 KiB reserve
        (32, 4, 116224, 1),
        # 16 x 32 = 512 -> 128 by registers, 228 by shared memory: the 32-program cap
        (16, 1, 0, 32),
    ],
)
def test_programs_per_sm_by_hand(registers, warps, shared, expected):
    assert kb.programs_per_sm(registers, warps, shared) == expected


@pytest.mark.parametrize(
    "work, binds",
    [
        (dict(flops=1000), "matmul"),
        (dict(hbm_bytes=1000), "HBM"),
        (dict(l2_bytes=1000), "L2"),
        (dict(exp2=1000), "exp2"),
    ],
)
def test_roofline_names_the_binding_resource(work, binds):
    machine = kb.Machine(matmul=100.0, hbm=10.0, l2=20.0, exp2=5.0)
    # Everything else costs 1 s on its resource; the one in ``work`` costs 10 s or more.
    args = {**dict(flops=100.0, hbm_bytes=10.0, l2_bytes=20.0, exp2=5.0), **work}
    times, got, bound = kb.roofline(**args, machine=machine)
    assert got == binds and bound == max(times.values()) >= 10
    assert sorted(times.values())[:3] == [1.0, 1.0, 1.0]


def test_fp32_peak_is_tf32x3():
    """TF32 runs at half the 16-bit tensor rate and tf32x3 issues three of them per dot."""
    assert kb.h100("float32").matmul * 6 == pytest.approx(kb.h100("bfloat16").matmul)
    assert kb.h100("float16") == kb.h100("bfloat16")


class _Capture:
    """Stands in for a Triton kernel: ``kernel[grid](*args)`` records (grid, args)."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args))


@pytest.mark.parametrize(
    "n, d, b, m",
    [
        (32768, 512, 4096, 65536),
        (1024, 64, 256, 2048),
        (300, 1000, 100, 70),
        (3840, 64, 512, 4096),  # 30 x 30 forward rectangles
    ],
)
def test_launch_plan_is_the_launchers(monkeypatch, n, d, b, m):
    """What launch_plan assumes equals what the host launchers pick on a 132-SM GPU: the
    forward's grid, the backward's split count (the shape of its output) and the lookup's."""
    import torch

    from declip_fast.kernels import contrastive, nn_lookup

    slots = lambda device, per_sm=1: kb.H100_SMS * per_sm
    fwd, bwd = _Capture(), _Capture()
    for name, value in [("concurrent_programs", slots), ("_fwd_kernel", fwd), ("_bwd_kernel", bwd)]:
        monkeypatch.setattr(contrastive, name, value)
    monkeypatch.setattr(nn_lookup, "concurrent_programs", slots)
    monkeypatch.setattr(nn_lookup, "interpreting", lambda: False)
    a = b_ = torch.zeros(n, d, dtype=torch.bfloat16)
    scale = torch.tensor(10.0)
    contrastive.forward_stats(a, b_, scale, 0, True)
    stats = (torch.zeros(n), torch.zeros(n))
    weights = (0.5 / n, 0.5 / n, 1 / n)
    contrastive.backward_grads(a, b_, scale, stats, stats, 0, weights, True, torch.tensor(1.0))
    plan = kb.launch_plan(n, d, b, m)
    assert fwd.launches[0][0] == (plan["p_r"], plan["p_c"])
    for _, args in bwd.launches:  # out: [P, D], or [S, P, D] fp32 partials
        out = args[8]
        assert (out.shape[0] if out.dim() == 3 else 1) == plan["backward_splits"]
    assert nn_lookup._splits(b, m, torch.device("cpu")) == plan["lookup_splits"]


def _expected_rows(n, d, b, m, dtype):
    from benchmarks.sm90 import contrastive_specs, lookup_specs

    specs = contrastive_specs(n, d, dtype)
    backward = sum(s["kernel"] == "_bwd_kernel" for s in specs)
    return {
        "forward": len(specs) - backward,
        "backward rows": backward,
        "backward columns": backward,
        "lookup": len(lookup_specs(b, m, d, dtype)),
    }


def _check_output(out, data, expected, built):
    assert {k: sum(r["kernel"] == k for r in data["rows"]) for k in expected} == expected
    bound_table = out.split("roofline bound")[1]
    for kernel, count in expected.items():  # a line per config in each printed table
        assert out.count(f"| {kernel.ljust(16)} |") == 2 * count, kernel
        assert bound_table.count(f"| {kernel.ljust(16)} |") == count, kernel
    for row in data["rows"]:
        assert math.isfinite(row["bound_s"]) and row["bound_s"] > 0 and row["atomics"] == 0
        assert row["binds"] in row["times_s"] and 0 < row["of_peak"] <= 1 + 1e-12
        assert ("registers" in row) == built and (row.get("programs_per_sm", 1) >= 1)
    step = data["loss_step"]
    assert math.isfinite(step["bound_s"]) and "Loss step" in out


def test_main_without_compile(tmp_path, capsys):
    n, d, b, m = 1024, 64, 256, 2048
    path = tmp_path / "budget.json"
    assert (
        kb.main(
            [
                "--n",
                str(n),
                "--d",
                str(d),
                "--lookup-b",
                str(b),
                "--lookup-m",
                str(m),
                "--no-compile",
                "--json",
                str(path),
            ]
        )
        == 0
    )
    data = json.loads(path.read_text())
    _check_output(capsys.readouterr().out, data, _expected_rows(n, d, b, m, "bfloat16"), built=False)
    # D = 64: one chunk per pass (BD narrowed to 64), so 2 + 4 + 4 N^2 D.
    assert data["loss_step"]["flops_per_n2d"] == 10


@pytest.mark.slow
def test_main_end_to_end_with_the_sm90_build(tmp_path, capsys):
    n, d, b, m = 1024, 64, 256, 2048
    path = tmp_path / "budget.json"
    assert (
        kb.main(
            [
                "--n",
                str(n),
                "--d",
                str(d),
                "--lookup-b",
                str(b),
                "--lookup-m",
                str(m),
                "--dtype",
                "float16",
                "--json",
                str(path),
            ]
        )
        == 0
    )
    data = json.loads(path.read_text())
    out = capsys.readouterr().out
    _check_output(out, data, _expected_rows(n, d, b, m, "float16"), built=True)
    assert "sm_90 build" in out
    assert all(r["registers"] > 0 and r["shared_bytes"] > 0 for r in data["rows"])

#!/usr/bin/env python3
"""Turn a benchmark results file into the ratio table (markdown) and scaling plots (PNG).

Usage: ``python benchmarks/report.py RESULTS.json [--out DIR]``. RESULTS.json is what ``make
bench`` or ``benchmarks/gpu_suite.sh`` writes: pytest-benchmark's JSON, plus the machine's
description in ``machine_info`` (benchmarks/machine.py) and the tables the run printed in
``tables`` (benchmarks/conftest.py). Written next to it (or into DIR):

- ``<stem>.md``: the machine, one table of ratios against the peers measured in the same run
  (ours / peer, for time and for peak extra memory: below 1 is faster / leaner), then every
  table the run printed;
- ``<stem>-loss.png``: loss forward + backward time and peak extra memory against the batch size
  N (bench_clip_loss on CPU, bench_contrastive on a GPU);
- ``<stem>-lookup.png``: the top-1 lookup's time and peak extra memory against the queue size M
  (bench_nn_lookup).

The ratios are recomputed from the numbers each benchmark stores (``params``, ``extra_info``),
not parsed from the printed tables. Standard library only, plus matplotlib for the plots (skipped
with a note where it is not installed, e.g. on the GPU box), so it runs as a plain script.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# module -> (what is measured, our impl, {peer impl: peer name}) for the suites that time the
# same call under several ``impl`` params.
PEERS = {
    "bench_clip_loss": ("ClipLoss fwd+bwd", "ours", {"open_clip": "OpenCLIP ClipLoss"}),
    "bench_contrastive": (
        "contrastive loss, bf16",
        "declip_fast",
        {"open_clip": "OpenCLIP ClipLoss", "inf_cl": "Inf-CL flash loss"},
    ),
    "bench_nn_lookup": ("top-1 lookup", "ours", {"torch": "torch matmul+max", "faiss": "faiss IndexFlatIP"}),
    "bench_step": (
        "CLIP training step + AdamW",
        "ours",
        {"open_clip": "OpenCLIP CLIP step", "ours_padded": "ours, text padded to 77 (packed=False)"},
    ),
    "bench_siglip": (
        "SigLipLoss fwd+bwd",
        "ours",
        {"open_clip": "OpenCLIP SigLipLoss", "open_clip_chunked": "OpenCLIP SigLipLoss(chunk_size)"},
    ),
    "bench_siglip_gpu": (
        "SigLipLoss fwd+bwd, bf16",
        "ours",
        {
            "open_clip": "OpenCLIP SigLipLoss",
            "open_clip_chunked": "OpenCLIP SigLipLoss(chunk_size)",
            "siglip_kernel": "siglip-kernel fused_siglip_loss",
        },
    ),
}


def load(path: Path) -> dict:
    """The results file, or SystemExit with a message saying why it is not one."""
    hint = "expected the JSON that `make bench` or benchmarks/gpu_suite.sh writes"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"report.py: {path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SystemExit(f"report.py: {path} is not a benchmark results file (not JSON: {err}); {hint}") from None
    if not (
        isinstance(data, dict)
        and isinstance(data.get("benchmarks"), list)
        and isinstance(data.get("machine_info"), dict)
    ):
        raise SystemExit(
            f"report.py: {path} is not a benchmark results file (no 'benchmarks' list and 'machine_info'); {hint}"
        )
    return data


def _module(entry: dict) -> str:
    return entry.get("fullname", "").split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")


def _seconds(entry: dict) -> float:
    return entry.get("extra_info", {}).get("median_s", entry["stats"]["median"])


def where(data: dict) -> str:
    """The device and date that title every table and plot."""
    info = data["machine_info"]
    device = info.get("device", "unknown device")
    if info.get("device_slug") == "cpu":
        device = f"CPU {device} ({info.get('cpu_count')} cores)"
    return f"{device}, {info.get('date', data.get('datetime', '')[:10])}"


def _ratio(x: float | None, fraction: bool = False) -> str:
    """0.55x; with ``fraction``, reductions as 1/5.2 (memory ratios span orders of magnitude)."""
    if x is None:
        return "-"
    if fraction and x < 1:
        return "0" if x == 0 else f"1/{1 / x:.1f}"
    return f"{x:.2f}x"


def _ms(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


# ---- the ratio rows, one function per kind of suite ------------------------------------------


def _case(entry: dict) -> str:
    """The case an entry measured, from its params other than impl (plus D and dtype if stored)."""
    params = {k: v for k, v in (entry.get("params") or {}).items() if k != "impl"}
    for key in ("d", "dtype"):
        if key not in params and key in entry.get("extra_info", {}):
            params[key] = entry["extra_info"][key]
    return " ".join(f"{k.upper()}={v}" if len(k) == 1 else str(v) for k, v in params.items())


def _pair_rows(entries: list[dict], module: str) -> list[dict]:
    what, ours, peers = PEERS[module]
    cases: dict[str, dict[str, dict]] = {}
    for entry in entries:
        cases.setdefault(_case(entry), {})[(entry.get("params") or {}).get("impl")] = entry
    rows = []
    for case, impls in cases.items():
        for impl, peer_name in peers.items():
            if ours not in impls or impl not in impls:
                continue
            mine, theirs = impls[ours], impls[impl]
            mem = [e.get("extra_info", {}).get("peak_extra_bytes") for e in (mine, theirs)]
            rows.append(
                dict(
                    benchmark=what,
                    case=case,
                    ours="declip_fast",
                    peer=peer_name,
                    ours_value=_ms(_seconds(mine)),
                    peer_value=_ms(_seconds(theirs)),
                    time=_seconds(mine) / _seconds(theirs),
                    memory=mem[0] / mem[1] if None not in mem and mem[1] > 0 else None,
                )
            )
    return rows


def _loader_rows(entries: list[dict]) -> list[dict]:
    """FFCV variants against the torch fallback, per augmentation setting (time per sample)."""
    rows = []
    for entry in entries:
        rates = {
            tuple(key.removesuffix("_samples_per_s").rsplit("_", 1)): value
            for key, value in entry.get("extra_info", {}).items()
            if key.endswith("_samples_per_s")
        }
        for (loader, setting), rate in rates.items():
            base = rates.get(("fallback", setting))
            if loader != "fallback" and base:
                rows.append(
                    dict(
                        benchmark="loader, two views at 224 px",
                        case=f"{setting} augmentation",
                        ours=loader,
                        peer="torch fallback loader",
                        ours_value=f"{rate:.0f} samples/s",
                        peer_value=f"{base:.0f} samples/s",
                        time=base / rate,
                        memory=None,
                    )
                )
    return rows


def _objective_rows(entries: list[dict], what: str = "training step, tiny presets") -> list[dict]:
    """The DeCLIP training step against the CLIP-only step, per caption set."""
    steps = {(e["params"].get("captions"), e["params"].get("objective")): e for e in entries if "params" in e}
    rows = []
    for captions in dict.fromkeys(c for c, _ in steps):
        clip, declip = steps.get((captions, "clip")), steps.get((captions, "released"))
        if clip and declip:
            interleaved = declip["extra_info"].get("interleaved_ratio")
            rows.append(
                dict(
                    benchmark=what,
                    case=f"{captions} captions",
                    ours="DeCLIP objective",
                    peer="CLIP-only step",
                    ours_value=_ms(_seconds(declip)),
                    peer_value=_ms(_seconds(clip)),
                    time=_seconds(declip) / _seconds(clip),
                    memory=None,
                    note=f"interleaved pairs: {interleaved:.2f}x" if interleaved else "",
                )
            )
    return rows


def _train_step_rows(entries: list[dict]) -> list[dict]:
    """bench_train_step: the full step with the optimizer (ViT-B/32 presets on a GPU, tiny on a CPU)."""
    info = entries[0].get("extra_info", {}) if entries else {}
    return _objective_rows(entries, f"training step + AdamW, batch {info.get('batch')}, {info.get('preset')} vs clip")


def _tokenizer_rows(entries: list[dict]) -> list[dict]:
    """Our tokenizer against OpenCLIP's, with a cold and a warm word cache."""
    rates = {e["params"].get("impl"): e["extra_info"] for e in entries if e.get("params")}
    if "ours" not in rates or "open_clip" not in rates:
        return []
    rows = []
    for cache in ("cold", "warm"):
        ours, theirs = (rates[i].get(f"captions_per_s_{cache}") for i in ("ours", "open_clip"))
        if ours and theirs:
            rows.append(
                dict(
                    benchmark="tokenizer",
                    case=f"{cache} cache",
                    ours="declip_fast",
                    peer="OpenCLIP SimpleTokenizer",
                    ours_value=f"{ours:,.0f} captions/s",
                    peer_value=f"{theirs:,.0f} captions/s",
                    time=theirs / ours,
                    memory=None,
                )
            )
    return rows


def ratio_rows(data: dict) -> list[dict]:
    """Every ours / peer comparison the file holds, in the order the suites ran."""
    by_module: dict[str, list[dict]] = {}
    for entry in data["benchmarks"]:
        by_module.setdefault(_module(entry), []).append(entry)
    special = {
        "bench_loader": _loader_rows,
        "bench_objective": _objective_rows,
        "bench_tokenizer": _tokenizer_rows,
        "bench_train_step": _train_step_rows,
    }
    rows = []
    for module, entries in by_module.items():
        if module in PEERS:
            rows += _pair_rows(entries, module)
        elif module in special:
            rows += special[module](entries)
    return rows


# ---- markdown ---------------------------------------------------------------------------------


def _md_table(rows: list[dict]) -> list[str]:
    cols = list(dict.fromkeys(k for row in rows for k in row))
    cell = lambda v: str(v).replace("|", "\\|")
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + [
        "| " + " | ".join(cell(row.get(c, "")) for c in cols) + " |" for row in rows
    ]


def ratio_markdown(data: dict) -> str:
    """The one table of ratios against the peers measured in the same run, with its heading."""
    lines = [
        f"## Ratios against peers measured in the same run ({where(data)})",
        "",
        "ours / peer: time (below 1: faster) and peak extra memory (below 1: leaner).",
        "",
    ]
    rows = [
        dict(
            benchmark=r["benchmark"],
            case=r["case"],
            ours=r["ours"],
            peer=r["peer"],
            ours_measured=r["ours_value"],
            peer_measured=r["peer_value"],
            time_ratio=_ratio(r["time"]),
            memory_ratio=_ratio(r["memory"], fraction=True),
            note=r.get("note", ""),
        )
        for r in ratio_rows(data)
    ]
    lines += _md_table(rows) if rows else ["(no benchmark with a peer ran)"]
    return "\n".join(lines) + "\n"


def markdown(data: dict, source: str) -> str:
    """The whole report: machine, ratio table, then every table the run printed."""
    info = {k: "n/a" if v is None else v for k, v in data["machine_info"].items()}
    commit = data["machine_info"].get("git_commit") or "unknown"
    dirty = {True: " (uncommitted changes)", False: ""}.get(info.get("git_dirty"), " (tree state unknown)")
    lines = [
        f"# Benchmarks: {where(data)}",
        "",
        f"- commit: {commit}{dirty}",
        f"- torch {info.get('torch')}, triton {info.get('triton')}, "
        f"CUDA {info.get('cuda_runtime')} (torch build), "
        f"driver {info.get('cuda_driver')}, Python {info.get('python', info.get('python_version'))}",
        f"- CPU: {info.get('cpu_name')}, {info.get('cpu_count')} cores",
        f"- source: {source}, {len(data['benchmarks'])} benchmark entries",
    ]
    peaks = data.get("peaks")
    if peaks:
        lines.append(
            f"- device peaks: bf16 matmul {peaks.get('bf16_matmul_tflops', 0):.0f} TFLOP/s, "
            f"device copy {peaks.get('copy_gb_s', 0):.0f} GB/s (read + write)"
        )
    lines += ["", ratio_markdown(data)]
    for name, rows in data.get("tables", {}).items():
        lines += [f"## {name} ({where(data)})", "", *_md_table(rows), ""]
    return "\n".join(lines)


# ---- plots ------------------------------------------------------------------------------------


def _loss_points(data: dict):
    """(series label, N, seconds, peak extra bytes) of every loss fwd+bwd measurement."""
    for entry in data["benchmarks"]:
        module, params, info = _module(entry), entry.get("params") or {}, entry.get("extra_info", {})
        if module == "bench_clip_loss":
            label = f"{params['impl']} (CPU {info.get('dtype', '')}, D={info.get('d')})"
        elif module == "bench_contrastive" and params.get("phase") == "fwd+bwd":
            label = f"{params['impl']} (bf16, D={params.get('d')})"
        else:
            continue
        yield label, params["n"], _seconds(entry), info.get("peak_extra_bytes")


def _lookup_points(data: dict):
    """(series label, M, seconds, peak extra bytes) of every lookup measurement."""
    for entry in data["benchmarks"]:
        if _module(entry) == "bench_nn_lookup":
            params, info = entry.get("params") or {}, entry.get("extra_info", {})
            label = f"{params['impl']} (B={params.get('b')}, D={params.get('d')}, {info.get('dtype', '')})"
            yield label, params["m"], _seconds(entry), info.get("peak_extra_bytes")


def _plain_ticks(ax, xs: list, ys: list) -> None:
    """Ticks at the measured sizes, and plain numbers (270, not 2.7x10^2) on log axes that span
    less than a decade, where matplotlib would otherwise label minor ticks in scientific form."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    ax.set_xticks(xs, [f"{x:,}" for x in xs])
    ax.xaxis.set_minor_locator(NullLocator())
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    if ys and min(ys) > 0 and max(ys) / min(ys) < 10:
        ax.yaxis.set_minor_formatter(plain)


def _plot(points: list[tuple], xlabel: str, what: str, where: str, path: Path) -> None:
    """Time and peak extra memory against x, one line per series (a lone marker where a series
    has one point, as CPU runs often do). The OO API: no pyplot, no global backend switch."""
    from matplotlib.figure import Figure

    series: dict[str, list[tuple]] = {}
    for label, x, seconds, extra in sorted(points, key=lambda p: p[1]):
        series.setdefault(label, []).append((x, seconds, extra))
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax_time, ax_mem = fig.subplots(1, 2)
    memory = []
    # Colour says the implementation, marker and line style the case ("impl (case)" labels), so
    # a dozen series stay tellable apart.
    impls = list(dict.fromkeys(label.split(" (")[0] for label in series))
    cases = list(dict.fromkeys(label.partition(" (")[2] for label in series))
    for label, pts in series.items():
        impl, _, case = label.partition(" (")
        k = cases.index(case)
        style = dict(
            color=f"C{impls.index(impl) % 10}",
            marker="os^Dvp*"[k % 7],
            linestyle=["-", "--", ":", "-."][k % 4],
            label=label,
        )
        ax_time.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], **style)
        mem = [(p[0], p[2] / 2**20) for p in pts if p[2] is not None]
        memory += [m for _, m in mem]
        ax_mem.plot([m[0] for m in mem], [m[1] for m in mem], **style)
    ax_time.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="median time (ms)", title="time (lower is faster)")
    ax_mem.set(xscale="log", xlabel=xlabel, ylabel="peak extra memory (MiB)", title="memory (lower is leaner)")
    if memory and min(memory) > 0:
        ax_mem.set_yscale("log")
    _plain_ticks(ax_time, sorted({p[1] for p in points}), [p[2] * 1e3 for p in points])
    _plain_ticks(ax_mem, sorted({p[1] for p in points}), memory)
    ax_time.legend(fontsize=7)
    fig.suptitle(f"{what}: {where}")
    fig.savefig(path, dpi=110)


def write_report(path: Path, out_dir: Path | None = None) -> list[Path]:
    """Print the ratio table; write the markdown and the plots; return the files written."""
    path = Path(path)
    data = load(path)
    out_dir = Path(out_dir) if out_dir else path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    print(ratio_markdown(data))
    md = out_dir / f"{path.stem}.md"
    md.write_text(markdown(data, path.name))
    written = [md]
    plots = [
        ("loss", list(_loss_points(data)), "batch size N", "Contrastive loss forward + backward"),
        ("lookup", list(_lookup_points(data)), "queue size M", "Top-1 nearest-neighbour lookup"),
    ]
    for name, points, xlabel, what in plots:
        if not points:
            print(f"no {name} measurements in {path.name}: no {name} plot")
            continue
        try:
            _plot(points, xlabel, what, where(data), out_dir / f"{path.stem}-{name}.png")
        except ImportError:
            print("matplotlib is not installed: no plots")
            break
        written.append(out_dir / f"{path.stem}-{name}.png")
    for file in written:
        print(f"wrote {file}")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a results JSON from `make bench` or gpu_suite.sh")
    parser.add_argument("--out", type=Path, help="folder for the .md and .png files (default: the results file's)")
    args = parser.parse_args(argv)
    write_report(args.results, args.out)


if __name__ == "__main__":
    main()

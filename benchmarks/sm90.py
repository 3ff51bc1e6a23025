"""Compile Triton kernels for an H100 (sm_90) on a machine without a GPU, and report resources.

``compile_sm90(specs)`` builds each kernel with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))``, then runs the ptxas that ships with Triton with ``-v`` on the
PTX to read registers, spill bytes and stack frame, the figures a GPU launch would report.

A real launch compiles a specialised kernel: Triton's launcher turns integer arguments equal to 1
into constants (unit strides) and marks 16-byte-aligned pointers and integers divisible by 16, which
changes vectorisation, pipelining, shared memory and registers. :func:`specialize` applies the same
rule to a spec's sample argument values (``tests/kernels/test_sm90_compile.py`` checks the rule
against Triton's own), so a build here is the kernel a launch at those shapes would run.
:func:`contrastive_specs` and :func:`lookup_specs` describe the project's kernels at a problem size,
for the compile tests and ``benchmarks/kernel_budget.py``.

Compilation runs in a child process: the test session sets TRITON_INTERPRET=1, under which
``@triton.jit`` yields interpreter objects that cannot be compiled, and the flag cannot be
switched off once Triton's language modules are imported.

A spec is a dict: ``module`` (import path), ``kernel`` (attribute name; an autotuned kernel is
unwrapped), ``signature`` (argument name -> Triton type, constexprs as "constexpr"),
``constexprs`` (name -> value), optional ``num_warps`` (4) and ``num_stages`` (3), and optional
``values`` (name -> sample value of each non-constexpr integer argument; present: the build is
specialised as a launch with those values would be, pointers taken as 16-byte aligned).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class KernelResources:
    name: str
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack_frame: int  # bytes
    shared: int  # bytes of shared memory Triton allocates
    has_wgmma: bool  # Hopper warp-group MMA in the PTX
    barriers: int  # tl.debug_barrier() calls that survive into the TTIR
    num_warps: int

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def compile_sm90(specs: list[dict], timeout: float = 600.0) -> list[KernelResources]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.sm90"],
        input=json.dumps(specs),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"sm_90 compilation failed:\n{proc.stderr[-4000:]}")
    return [KernelResources(**r) for r in json.loads(proc.stdout)]


# Registers a thread may use in a config we ship: 255 is the hardware cap, and a kernel at the cap
# has usually been squeezed by ptxas (or is one change away from spilling).
MAX_REGISTERS = 240


def hopper_problems(specs: list[dict], pointer: str | None = None) -> list[str]:
    """Compile ``specs`` for sm_90; one line per config that spills, uses more than
    MAX_REGISTERS registers, or has 16-bit inputs (the type of argument ``pointer``, default the
    kernel's first argument) and no wgmma in its PTX."""
    problems = []
    for spec, res in zip(specs, compile_sm90(specs)):
        ptr = spec["signature"][pointer or next(iter(spec["signature"]))]
        what = f"{spec['kernel']} {ptr} {spec['constexprs']}"
        what += " (specialised)" if spec.get("values") else " (plain)"
        if res.spills:
            problems.append(f"{what}: {res.spills} spill bytes ({res.registers} registers)")
        elif res.registers > MAX_REGISTERS:
            problems.append(f"{what}: {res.registers} registers > {MAX_REGISTERS}")
        if ptr != "*fp32" and not res.has_wgmma:
            problems.append(f"{what}: no wgmma in the PTX")
    return problems


def specialize(signature: dict, values: dict) -> tuple[dict, dict, list]:
    """(signature, extra constexprs, names marked divisible by 16) of a launch whose integer
    arguments take ``values``, by the rule of Triton's launcher: an integer equal to 1 becomes the
    constant 1, an integer divisible by 16 (0 included) and every pointer (PyTorch allocations are
    aligned, and our launchers pass whole tensors) are marked divisible by 16; floats are not
    specialised."""
    signature, constants, hints = dict(signature), {}, []
    for name, ty in signature.items():
        if ty.startswith("*"):
            hints.append(name)
        elif ty in ("i32", "i64") and name in values:
            value = int(values[name])
            if value == 1:
                signature[name] = "constexpr"
                constants[name] = 1
            elif value % 16 == 0:
                hints.append(name)
    return signature, constants, hints


_T = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}


def _input_class(dtype: str) -> str:
    return "fp32" if dtype == "float32" else "16-bit"


def _precision(dtype: str) -> str:
    return "tf32x3" if dtype == "float32" else "tf32"


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _spec(module, kernel, types, values, consts, opts, specialized):
    signature = dict(types, **{c: "constexpr" for c in consts})
    spec = dict(module=module, kernel=kernel, signature=signature, constexprs=consts, **opts)
    if specialized:
        spec["values"] = values
    return spec


def contrastive_specs(n: int, d: int, dtype: str, specialized: bool = True) -> list[dict]:
    """The fused loss's forward and backward (row pass, symmetric) at N x N, width ``d``, in
    ``dtype`` ("bfloat16", "float16", "float32"): one spec per Hopper config, each tagged with
    ``config`` (its meta-parameters). Reads the config tables without importing Triton kernels
    into this process (the module is imported by name in the compile child)."""
    import importlib

    mod = importlib.import_module("declip_fast.kernels.contrastive")
    t = _T[dtype]
    specs = []
    fwd_types = dict(
        a_ptr=t,
        b_ptr=t,
        scale_ptr="*fp32",
        row_m_ptr="*fp32",
        row_l_ptr="*fp32",
        col_m_ptr="*fp32",
        col_l_ptr="*fp32",
        pos_ptr="*fp32",
        M="i32",
        N="i32",
        D="i32",
        offset="i32",
        M_BUCKET="i32",
        N_BUCKET="i32",
        stride_am="i32",
        stride_ad="i32",
        stride_bn="i32",
        stride_bd="i32",
    )
    fwd_values = dict(
        M=n,
        N=n,
        D=d,
        offset=0,
        M_BUCKET=_bucket(n),
        N_BUCKET=_bucket(n),
        stride_am=d,
        stride_ad=1,
        stride_bn=d,
        stride_bd=1,
    )
    for meta, opts in mod.HOPPER_FWD[_input_class(dtype)]:
        consts = dict(SYMMETRIC=True, PRECISION=_precision(dtype), **meta)
        spec = _spec(mod.__name__, "_fwd_kernel", fwd_types, fwd_values, consts, opts, specialized)
        specs.append(dict(spec, config=meta))
    bwd_types = dict(
        p_ptr=t,
        q_ptr=t,
        scale_ptr="*fp32",
        mult_ptr="*fp32",
        own_m_ptr="*fp32",
        own_l_ptr="*fp32",
        oth_m_ptr="*fp32",
        oth_l_ptr="*fp32",
        out_ptr=t,
        ds_ptr="*fp32",
        P="i32",
        Q="i32",
        D="i32",
        shift="i32",
        P_BUCKET="i32",
        Q_BUCKET="i32",
        w_own="fp32",
        w_other="fp32",
        stride_pp="i32",
        stride_pd="i32",
        stride_qq="i32",
        stride_qd="i32",
        stride_out_split="i32",
    )
    bwd_values = dict(
        P=n,
        Q=n,
        D=d,
        shift=0,
        P_BUCKET=_bucket(n),
        Q_BUCKET=_bucket(n),
        stride_pp=d,
        stride_pd=1,
        stride_qq=d,
        stride_qd=1,
        stride_out_split=0,
    )
    for meta, opts in mod.HOPPER_BWD[_input_class(dtype)]:
        if d % 16 and meta not in mod.ANY_D_BWD:
            continue  # the launcher drops it for such D (contrastive._narrow_chunk)
        meta = dict(meta, BD=min(meta["BD"], max(16, 1 << (d - 1).bit_length())))
        consts = dict(OWN_STATS=True, OTHER_STATS=True, WANT_DS=True, PRECISION=_precision(dtype), **meta)
        spec = _spec(mod.__name__, "_bwd_kernel", bwd_types, bwd_values, consts, opts, specialized)
        specs.append(dict(spec, config=meta))
    return specs


def lookup_specs(b: int, m: int, d: int, dtype: str, specialized: bool = True) -> list[dict]:
    """The top-1 lookup of ``b`` queries in ``m`` bank rows of width ``d``: one spec per Hopper
    config, tagged with ``config``."""
    import importlib

    mod = importlib.import_module("declip_fast.kernels.nn_lookup")
    t = _T[dtype]
    types = dict(
        q_ptr=t,
        k_ptr=t,
        score_ptr="*fp32",
        index_ptr="*i64",
        B="i32",
        M="i32",
        D="i32",
        B_BUCKET="i32",
        M_BUCKET="i32",
        stride_qb="i32",
        stride_qd="i32",
        stride_km="i32",
        stride_kd="i32",
    )
    values = dict(
        B=b, M=m, D=d, B_BUCKET=_bucket(b), M_BUCKET=_bucket(m), stride_qb=d, stride_qd=1, stride_km=d, stride_kd=1
    )
    specs = []
    for meta, opts in mod.HOPPER[_input_class(dtype)]:
        consts = dict(PRECISION=_precision(dtype), **meta)
        spec = _spec(mod.__name__, "_lookup_kernel", types, values, consts, opts, specialized)
        specs.append(dict(spec, config=meta))
    return specs


_PTXAS_PATTERNS = {
    "registers": r"Used (\d+) registers",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "stack_frame": r"(\d+) bytes stack frame",
}


def _ptxas_report(ptx: str, workdir: Path) -> dict:
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    src = workdir / "kernel.ptx"
    src.write_text(ptx)
    out = subprocess.run(
        [str(ptxas), "-v", "--gpu-name", "sm_90a", str(src), "-o", str(workdir / "kernel.cubin")],
        capture_output=True,
        text=True,
        check=True,
    )
    log = out.stdout + out.stderr
    report = {}
    for key, pattern in _PTXAS_PATTERNS.items():
        found = re.search(pattern, log)
        if found is None:
            raise RuntimeError(f"ptxas -v printed no {key!r}:\n{log}")
        report[key] = int(found.group(1))
    return report


def _compile_one(spec: dict, workdir: Path) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    while not isinstance(fn, triton.runtime.jit.JITFunction):  # Autotuner / Heuristics wrappers
        fn = fn.fn
    signature, constexprs, attrs = dict(spec["signature"]), dict(spec.get("constexprs", {})), {}
    if spec.get("values"):
        signature, extra, hints = specialize(signature, spec["values"])
        constexprs.update(extra)
        attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in hints}
    src = ASTSource(fn, signature, constexprs, attrs)
    options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)}
    if spec.get("maxnreg"):
        options["maxnreg"] = spec["maxnreg"]
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = compiled.asm["ptx"]
    return dict(
        name=compiled.metadata.name,
        shared=compiled.metadata.shared,
        has_wgmma="wgmma" in ptx,
        barriers=sum(compiled.asm["ttir"].count(op) for op in ("gpu.barrier", "ttg.barrier")),
        num_warps=options["num_warps"],
        **_ptxas_report(ptx, workdir),
    )


def _main() -> None:
    import tempfile

    specs = json.loads(sys.stdin.read())
    with tempfile.TemporaryDirectory() as tmp:
        results = [_compile_one(spec, Path(tmp)) for spec in specs]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    _main()

"""Compile Triton kernels for an H100 (sm_90) on a machine without a GPU, and report resources.

``compile_sm90(specs)`` builds each kernel with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))``, then runs the ptxas that ships with Triton with ``-v`` on the
PTX to read registers, spill bytes and stack frame, the figures a GPU launch would report.

Compilation runs in a child process: the test session sets TRITON_INTERPRET=1, under which
``@triton.jit`` yields interpreter objects that cannot be compiled, and the flag cannot be
switched off once Triton's language modules are imported.

A spec is a dict: ``module`` (import path), ``kernel`` (attribute name; an autotuned kernel is
unwrapped), ``signature`` (argument name -> Triton type, constexprs as "constexpr"),
``constexprs`` (name -> value), and optional ``num_warps`` (4) and ``num_stages`` (3).
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

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def compile_sm90(specs: list[dict], timeout: float = 600.0) -> list[KernelResources]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.sm90"],
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


def hopper_problems(specs: list[dict], pointer: str) -> list[str]:
    """Compile ``specs`` for sm_90; one line per config that spills, or that has 16-bit inputs
    (the type of argument ``pointer``) and no wgmma in its PTX."""
    problems = []
    for spec, res in zip(specs, compile_sm90(specs)):
        what = f"{spec['kernel']} {spec['signature'][pointer]} {spec['constexprs']}"
        if res.spills:
            problems.append(f"{what}: {res.spills} spill bytes ({res.registers} registers)")
        if spec["signature"][pointer] != "*fp32" and not res.has_wgmma:
            problems.append(f"{what}: no wgmma in the PTX")
    return problems


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
    src = ASTSource(fn, spec["signature"], spec.get("constexprs", {}))
    options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)}
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = compiled.asm["ptx"]
    return dict(
        name=compiled.metadata.name,
        shared=compiled.metadata.shared,
        has_wgmma="wgmma" in ptx,
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

"""Peak extra host memory of one loss forward + backward, measured in a fresh process.

Run as ``python -m benchmarks.peak_memory --impl ours --n 16384 --d 512``; prints JSON.
A small warm-up step runs and the inputs are allocated first; then the kernel's resident-set high-water mark is reset
(``/proc/self/clear_refs``, Linux >= 4.0) and one forward + backward runs. "Extra" is the peak
resident set during that step minus the resident set before it: the logits, softmax buffers and
gradients the loss needs, as the operating system sees them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def loss_module(impl: str):
    if impl == "ours":
        from declip_fast.losses import ClipLoss
    elif impl == "open_clip":
        from open_clip.loss import ClipLoss
    else:
        raise ValueError(f"unknown impl {impl!r}")
    return ClipLoss()


def correlated_features(n: int, d: int, dtype=None, seed: int = 0, device: str = "cpu"):
    """Unit image features ``[n, d]`` and text features correlated with them (each its image's
    plus noise, normalised): a non-flat loss, as trained features give. The loss benchmarks'
    inputs, drawn on ``device``; cast to ``dtype`` when given."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=gen), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=gen) + img, dim=-1)
    return (img, txt) if dtype is None else (img.to(dtype), txt.to(dtype))


def make_inputs(n: int, d: int, dtype, seed: int = 0):
    import torch

    img, txt = correlated_features(n, d, dtype, seed)
    scale = torch.tensor(1 / 0.07)
    return img.requires_grad_(True), txt.requires_grad_(True), scale.requires_grad_(True)


def step_extra_bytes(step) -> int:
    """Peak extra resident bytes while ``step()`` runs: the high-water mark is reset to the
    current resident set first (the caller has warmed up and allocated the inputs)."""
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    step()
    return (_status_kib("VmHWM") - before) * 1024


def in_fresh_process(module: str, impl: str, n: int, d: int) -> int:
    """``python -m module --impl IMPL --n N --d D`` (a probe printing this module's JSON):
    the extra bytes it measured, in a process of its own."""
    cmd = [sys.executable, "-m", module, "--impl", impl, "--n", str(n), "--d", str(d)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(out.stdout)["extra_bytes"]


def measure(impl: str, n: int, d: int, dtype: str = "float32") -> dict:
    import torch

    loss_fn = loss_module(impl)
    # A small warm-up step first, so one-off costs (lazily loaded math libraries, thread pools)
    # are not charged to the step being measured.
    loss_fn(*make_inputs(min(n, 256), d, getattr(torch, dtype))).backward()
    img, txt, scale = make_inputs(n, d, getattr(torch, dtype))
    extra = step_extra_bytes(lambda: loss_fn(img, txt, scale).backward())
    return {"impl": impl, "n": n, "d": d, "extra_bytes": extra}


def probe_main(measure_fn, impls: list[str], description: str) -> None:
    """The probe's command line (what :func:`in_fresh_process` runs): ``--impl --n --d
    [--dtype]``, prints ``measure_fn(impl, n, d, dtype)`` as JSON."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--impl", required=True, choices=impls)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--d", type=int, required=True)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    print(json.dumps(measure_fn(args.impl, args.n, args.d, args.dtype)))


def main() -> None:
    probe_main(measure, ["ours", "open_clip"], __doc__.splitlines()[0])


if __name__ == "__main__":
    main()

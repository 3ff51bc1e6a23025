"""What this GPU can do on the day: its bf16 matrix-product rate and device memory copy bandwidth.

Every "fraction of peak" in the benchmarks divides by a rate measured in the same run; these two
numbers, stored once per gpu_suite.sh run (its ``peaks`` part), say whether the box itself was
healthy (clocks, power cap, another tenant) before anything else is read. Run as
``python -m benchmarks.device_peaks --out peaks.json``; needs a CUDA device.

- bf16 TFLOP/s: ``torch.mm`` of two 8192 x 8192 bf16 matrices (2 n^3 FLOPs), median of 20 timed
  by CUDA events (benchmarks/peaks.py), the reference the contrastive and attention suites use.
- copy GB/s: ``dst.copy_(src)`` of a 1 GiB buffer, counting the bytes read plus the bytes
  written, as memory-bandwidth specifications do; median of 20 runs of 5 copies.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.machine import metadata
from benchmarks.peaks import cuda_time, gpu_bf16_matmul_tflops

MATMUL_N = 8192
COPY_BYTES = 2**30


def copy_gb_s(nbytes: int = COPY_BYTES) -> float:
    """Device-to-device copy rate in GB/s, read + write bytes."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 256)
    dst = torch.empty_like(src)
    seconds = cuda_time(lambda: dst.copy_(src), reps=20, iters=5)
    return 2 * nbytes / seconds / 1e9


def measure() -> dict:
    return {
        "bf16_matmul_tflops": gpu_bf16_matmul_tflops(MATMUL_N),
        "matmul_n": MATMUL_N,
        "copy_gb_s": copy_gb_s(),
        "copy_bytes": COPY_BYTES,
        "machine": metadata(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("device_peaks.py: needs a CUDA device")
    text = json.dumps(measure(), indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Download the small wheels an offline GPU box lacks into .whl/ (git-ignored; the device tool
# carries it): the benchmark peers Inf-CL, OpenCLIP and siglip-kernel, and what importing OpenCLIP's
# loss needs.
# torch and triton are never fetched: the box's own are used. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/python -m pip}"
mkdir -p .whl
$PIP download -q --no-deps -d .whl inf-cl open-clip-torch siglip-kernel ftfy wcwidth tqdm
for py in 3.10 3.11 3.12 3.13; do  # regex is compiled: one wheel per Python the box may have
  $PIP download -q --no-deps --only-binary :all: --python-version "$py" \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl regex
done
ls .whl

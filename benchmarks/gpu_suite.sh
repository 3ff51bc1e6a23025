#!/usr/bin/env bash
# The one script a GPU box runs (offline; its own torch + triton): installs the project without
# dependencies, runs the gpu tests, then the GPU benchmarks, writing logs and JSON under $OUT.
# Usage: benchmarks/gpu_suite.sh [tests] [contrastive] [lookup] [attention] [towers] (default: all).
# A failing part is reported and the rest still runs; the exit code says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%F)}
mkdir -p "$OUT"
status=0
run() {  # run NAME CMD...: log to $OUT/NAME.log, remember a failure, go on
  local name=$1; shift
  echo "== $name"
  if ! "$@" 2>&1 | tee "$OUT/$name.log"; then echo "!! $name failed"; status=1; fi
}
export PYTHONUNBUFFERED=1
# Peers brought along by scripts/fetch_wheels.sh (a compatible wheel each; installed ones kept).
if [ -d .whl ]; then
  run peers python3 -m pip install -q --no-index --find-links .whl --no-deps \
    inf-cl open-clip-torch ftfy wcwidth regex tqdm
fi
run install python3 -m pip install -q --no-deps --no-build-isolation -e .
run versions python3 -c "import torch, triton, subprocess; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name()); print(subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'], capture_output=True, text=True).stdout)"
# Parts, in order; pass a subset (e.g. `gpu_suite.sh tests contrastive`) to stay within one
# device call's 10 minutes: the towers compile four full-size models.
parts=${*:-"tests contrastive lookup attention towers"}
for part in $parts; do
  case $part in
    tests) run gpu-tests python3 -m pytest tests -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" ;;
    contrastive|lookup|attention|towers)
      file=benchmarks/bench_$part.py
      [ $part = lookup ] && file=benchmarks/bench_nn_lookup.py
      run "bench-$part" python3 -m pytest "$file" -q -p no:cacheprovider --benchmark-json="$OUT/bench_$part.json" ;;
    *) echo "!! unknown part $part"; status=1 ;;
  esac
done
exit $status

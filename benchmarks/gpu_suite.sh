#!/usr/bin/env bash
# The one script a GPU box runs (offline; its own torch + triton): installs the project without
# dependencies, measures the box's peaks, runs the gpu tests, then the GPU benchmarks, writing logs
# and JSON under $OUT. The benchmarks' files are merged into $OUT/<date>-<device>.json (+ .md), the
# format `make bench` writes, so benchmarks/report.py reads either.
# Usage: benchmarks/gpu_suite.sh [--dry-run] [peaks] [budget] [tests] [contrastive] [lookup] [siglip] [attention] [towers] [step] [train]
# (default: all). A failing part is reported and the rest still runs; the exit code says whether
# all passed. PYTHON picks the interpreter (default python3).
# --dry-run (or DRY_RUN=1) needs no GPU and installs nothing: it checks that the gpu tests are
# found and that each benchmark file named exists and collects; non-zero if something is missing.
# Each device call has a fresh $OUT; merge the parts of several calls afterwards with
# `python -m benchmarks.run --merge A/bench_*.json B/bench_*.json --peaks A/peaks.json`.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
names=()
for arg in "$@"; do
  if [ "$arg" = --dry-run ]; then DRY_RUN=1; else names+=("$arg"); fi
done
# Parts, in order; pass a subset (e.g. `gpu_suite.sh tests contrastive`) to stay within one
# device call's 10 minutes: the towers compile four full-size models.
parts=${names[*]:-"peaks budget tests contrastive lookup siglip attention towers step train"}
status=0
export PYTHONUNBUFFERED=1

bench_file() {  # the benchmark file of a part
  case $1 in lookup) echo benchmarks/bench_nn_lookup.py ;; train) echo benchmarks/bench_train_step.py ;;
    siglip) echo benchmarks/bench_siglip_gpu.py ;;
    *) echo "benchmarks/bench_$1.py" ;; esac
}
is_bench() { case $1 in contrastive|lookup|siglip|attention|towers|step|train) return 0 ;; *) return 1 ;; esac; }
collect() {  # collect ARGS...: the node ids pytest collects, one a line; fails as pytest does
  $PY -m pytest --collect-only -q -p no:cacheprovider "$@" 2>&1 | grep '^[^ ]*::'
}

if [ "$DRY_RUN" = 1 ]; then
  ok() { echo "dry-run: $1 ok${2:+ ($2)}"; }
  bad() { echo "!! dry-run: $1: $2"; status=1; }
  files=()
  for part in $parts; do
    is_bench "$part" && [ -f "$(bench_file "$part")" ] && files+=("$(bench_file "$part")")
  done
  # One pytest for all the benchmark files (imports are the cost); a file that fails to import
  # collects nothing and so fails its part.
  bench_ids=$( [ ${#files[@]} -gt 0 ] && collect --continue-on-collection-errors "${files[@]}")
  for part in $parts; do
    case $part in
      peaks)
        if $PY -m py_compile benchmarks/device_peaks.py 2>/dev/null; then ok peaks "benchmarks/device_peaks.py"
        else bad peaks "benchmarks/device_peaks.py is missing or does not compile"; fi ;;
      budget)
        if $PY -m benchmarks.kernel_budget --help >/dev/null 2>&1; then ok budget "benchmarks/kernel_budget.py"
        else bad budget "python -m benchmarks.kernel_budget --help fails"; fi ;;
      tests)
        ids=$(collect tests -m gpu); rc=$?
        n=$(grep -c . <<<"$ids")
        if [ $rc -ne 0 ] || [ "$n" -eq 0 ]; then bad tests "pytest tests -m gpu collects $n tests (exit $rc)"
        else ok tests "$n gpu tests"; fi ;;
      *)
        if ! is_bench "$part"; then bad "$part" "unknown part"; continue; fi
        file=$(bench_file "$part")
        n=$(grep -c "^$file::" <<<"$bench_ids")
        if [ ! -f "$file" ]; then bad "$part" "$file is missing"
        elif [ "$n" -eq 0 ]; then bad "$part" "$file collects no benchmarks"
        else ok "$part" "$file, $n benchmarks"; fi ;;
    esac
  done
  for tool in "-m benchmarks.run" "benchmarks/report.py"; do
    $PY $tool --help >/dev/null 2>&1 || bad merge "$PY $tool --help fails"
  done
  echo "dry-run: $([ $status = 0 ] && echo all parts found || echo SOMETHING IS MISSING)"
  exit $status
fi

OUT=${OUT:-benchmarks/results/gpu-$(date +%F)}
mkdir -p "$OUT"
run() {  # run NAME CMD...: log to $OUT/NAME.log, remember a failure, go on
  local name=$1; shift
  echo "== $name"
  if ! "$@" 2>&1 | tee "$OUT/$name.log"; then echo "!! $name failed"; status=1; fi
}
# Peers brought along by scripts/fetch_wheels.sh (a compatible wheel each; installed ones kept).
if [ -d .whl ]; then
  run peers $PY -m pip install -q --no-index --find-links .whl --no-deps \
    inf-cl open-clip-torch ftfy wcwidth regex tqdm
fi
run install $PY -m pip install -q --no-deps --no-build-isolation -e .
run versions $PY -m benchmarks.machine  # device, versions, driver, commit: JSON
for part in $parts; do
  case $part in
    peaks) run peaks $PY -m benchmarks.device_peaks --out "$OUT/peaks.json" ;;
    # The roofline bounds the timings are held against (counts only: the sm_90 builds are CI's).
    budget) run budget $PY -m benchmarks.kernel_budget --no-compile --json "$OUT/budget.json" ;;
    tests) run gpu-tests $PY -m pytest tests -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" ;;
    *)
      if is_bench "$part"; then
        run "bench-$part" $PY -m pytest "$(bench_file "$part")" -q -p no:cacheprovider \
          --benchmark-json="$OUT/bench_$part.json"
      else echo "!! unknown part $part"; status=1; fi ;;
  esac
done
# This call's benchmark files as one results file (+ its .md; plots where matplotlib exists).
shopt -s nullglob
jsons=("$OUT"/bench_*.json)
if [ ${#jsons[@]} -gt 0 ]; then
  peaks=()
  [ -f "$OUT/peaks.json" ] && peaks=(--peaks "$OUT/peaks.json")
  run merge $PY -m benchmarks.run --merge "${jsons[@]}" ${peaks[@]+"${peaks[@]}"}
fi
exit $status

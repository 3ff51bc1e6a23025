# The README's commands. Each target installs what it needs first (scripts/setup.sh is
# idempotent and silent when nothing changed).
PY := .venv/bin/python

.PHONY: setup test test-fast lint typecheck demo bench clean
setup:
	@./scripts/setup.sh

test: setup
	$(PY) -m pytest

# The edit loop: the suite without the tests marked slow.
test-fast: setup
	$(PY) -m pytest -m "not slow"

# The lint gate: ruff's pyflakes, pycodestyle and bugbear rules, ruff's formatter (`ruff format .`
# fixes what it finds), then mypy on the public API (all configured in pyproject.toml).
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# The public API's type check (the [tool.mypy] files in pyproject.toml); make lint runs it too.
typecheck: setup
	$(PY) -m mypy

# The `demo` preset: tiny DeCLIP towers on the Fashion-MNIST demo data, a few minutes on the CPU,
# zero-shot accuracy at the end; the run folder is runs/demo. configs/demo.yaml names the data
# files; write-dataset --demo builds them when missing or incomplete (a no-op once built).
demo: setup
	.venv/bin/declip-fast write-dataset --demo data/demo
	.venv/bin/declip-fast train demo

# Every benchmark that applies to this machine (the CUDA suites skip themselves on a CPU):
# benchmarks/results/<date>-<device>.json with the machine's description, its .md and plots,
# and the table of ratios against the peers printed at the end (benchmarks/run.py).
# BENCH_ARGS narrows it, e.g. `make bench BENCH_ARGS="benchmarks/bench_text_views.py -k masking"`.
# Then the kernel budget (benchmarks/kernel_budget.py, no GPU needed): each Triton kernel config's
# FLOPs, bytes, sm_90 build and H100 roofline bound, the times a GPU run is held against.
bench: setup
	$(PY) -m benchmarks.run $(BENCH_ARGS)
	$(PY) -m benchmarks.kernel_budget

clean:
	rm -rf .venv build *.egg-info .pytest_cache .benchmarks

# The README's commands. Each target installs what it needs first (scripts/setup.sh is
# idempotent and silent when nothing changed).
PY := .venv/bin/python

.PHONY: setup test demo bench clean
setup:
	@./scripts/setup.sh

test: setup
	$(PY) -m pytest

# The `demo` preset: tiny DeCLIP towers on the Fashion-MNIST demo data (built on first use), a
# few minutes on the CPU, zero-shot accuracy at the end; the run folder is runs/demo.
demo: setup
	.venv/bin/declip-fast train demo

bench: setup
	$(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-columns=median,rounds \
		--benchmark-json=benchmarks/results/$$(date +%F)-cpu.json

clean:
	rm -rf .venv build *.egg-info .pytest_cache .benchmarks

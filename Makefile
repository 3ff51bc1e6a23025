# The README's commands. Each target installs what it needs first (scripts/setup.sh is
# idempotent and silent when nothing changed).
PY := .venv/bin/python

.PHONY: setup test demo bench clean
setup:
	@./scripts/setup.sh

test: setup
	$(PY) -m pytest

# Until the trainer lands, the demo is the CPU loss benchmark and its table of ratios.
demo: setup
	$(PY) -m pytest benchmarks/bench_clip_loss.py -q -p no:cacheprovider --benchmark-columns=median,rounds

bench: setup
	$(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-columns=median,rounds \
		--benchmark-json=benchmarks/results/$$(date +%F)-cpu.json

clean:
	rm -rf .venv build *.egg-info .pytest_cache .benchmarks

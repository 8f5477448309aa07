# The two quick-start commands: `make demo` (the viewer on the embedded demo study, drafting a report)
# and `make test` (the whole test suite); `make lint` (ruff, configured in pyproject.toml) and `make bench`
# (the CPU benchmarks at quick sizes; `make bench BENCH_ARGS=--full` at their documented sizes,
# `make bench-gpu` on a CUDA machine). All create or update .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast lint bench bench-gpu clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	@bash scripts/test.sh

test-fast: setup
	@bash scripts/test.sh -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	@bash scripts/bench.sh $(BENCH_ARGS)

bench-gpu: setup
	$(PY) bench/gpu.py

clean:
	rm -rf $(VENV) artifacts .pytest_cache

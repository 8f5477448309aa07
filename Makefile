# The two quick-start commands: `make demo` (the viewer on the embedded demo study, drafting a report)
# and `make test` (the whole test suite). Both create or update .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	@bash scripts/test.sh

test-fast: setup
	@bash scripts/test.sh -m "not slow"

clean:
	rm -rf $(VENV) artifacts .pytest_cache

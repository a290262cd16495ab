# README's two commands: `make demo` and `make test`. Each installs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Most test time is XLA compilation of tiny models: two pytest-xdist workers (one compiles while the other
# runs), and the CPU backend's LLVM at -O0 (tests/test_offload.py: 88 -> 70 s; the models are too small to care).
TEST_WORKERS ?= 2
PYTEST := XLA_FLAGS="--xla_backend_optimization_level=0 $(XLA_FLAGS)" $(BIN)/python -m pytest -q \
	-n $(TEST_WORKERS) --dist worksteal

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
	$(PYTEST) -m "not slow" tests

test-slow: install
	$(PYTEST) -m slow tests

bench: install
	$(BIN)/specpv-jax bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

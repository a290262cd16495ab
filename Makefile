# README's two commands: `make demo` and `make test`. Each installs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The test extras (pytest, torch as a parity oracle, ...) go in only for the targets that test: the demo
# needs none of them, and torch from PyPI is a multi-GB CUDA build on Linux.
TEST_STAMP := $(VENV)/.installed-test
# Most test time is XLA compilation of tiny models: two pytest-xdist workers (one compiles while the other
# runs), and the CPU backend's LLVM at -O0 (tests/test_offload.py: 88 -> 70 s; the models are too small to care).
TEST_WORKERS ?= 2
# JAX's persistent compilation cache, one for the three suites: `make test-min` runs the jaxlib `make test` does
# and reuses its programs. Keyed by program, flags and versions; `make clean` empties it. (2-core VM, 2026-12-07:
# the whole suite warm 731 s against 1494 s without the cache; a cold cache 1492 s.)
JAX_CACHE := $(CURDIR)/.jax-cache
# jaxlib 0.10's XLA:CPU also compiles about twice as fast without its fusion emitters (its older elemental
# emitters instead) and runs the test models as fast: the whole suite 1487 -> 1062 s, cold (2-core VM,
# 2026-12-07). jaxlib 0.11 has no such flag (XLA aborts on it): not for test-next.
NO_FUSION_EMITTERS = --xla_cpu_use_fusion_emitters=false
PYTEST_ENV = XLA_FLAGS="--xla_backend_optimization_level=0 $(NO_FUSION_EMITTERS) $(XLA_FLAGS)" \
	JAX_COMPILATION_CACHE_DIR=$(JAX_CACHE) \
	JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
# --durations: each run lists its slowest tests (what to trim if the suite nears its 20 minutes)
PYTEST_ARGS := -q -n $(TEST_WORKERS) --dist worksteal --durations=15
PYTEST = $(PYTEST_ENV) $(BIN)/python -m pytest $(PYTEST_ARGS)
# `make test-next`: the suite on the newest JAX PyPI serves for Python >= 3.12 (0.11.x, as on our GPU machine),
# less the torch parity tests (no CPU torch for 3.12 on this machine's registries). Another interpreter:
# make test-next NEXT_PYTHON=~/.pyenv/versions/3.12.1/bin/python
NEXT_PYTHON ?= python3.12
NEXT := .venv-next
# `make test-min`: the suite with every dependency at the floor pyproject.toml gives it (pins read off it), so a
# floor that no longer holds fails here rather than in a user's older environment.
MIN := .venv-min

.PHONY: install demo test test-slow test-next test-min bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(TEST_STAMP)

demo: install
	$(BIN)/specpv-jax demo

test: $(TEST_STAMP)
	$(PYTEST) -m "not slow" tests

test-slow: $(TEST_STAMP)
	$(PYTEST) -m slow tests

test-next: NO_FUSION_EMITTERS =
test-next:
	test -x $(NEXT)/bin/python || $(NEXT_PYTHON) -m venv $(NEXT)
	$(NEXT)/bin/python -m pip install -q -e '.[test-core]'
	$(PYTEST_ENV) $(NEXT)/bin/python -m pytest $(PYTEST_ARGS) -m "not slow and not torch" \
		--ignore tests/test_parity.py --ignore tests/test_eagle_checkpoint.py tests

test-min:
	test -x $(MIN)/bin/python || $(PYTHON) -m venv $(MIN)
	$(PYTHON) -c 'import re, tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
		print("\n".join(re.sub(r"\s*>=\s*([^,]+).*", r"==\1", d) for d in deps))' > $(MIN)/floors.txt
	$(MIN)/bin/python -m pip install -q -c $(MIN)/floors.txt -e '.[test]'
	$(PYTEST_ENV) $(MIN)/bin/python -m pytest $(PYTEST_ARGS) -m "not slow" tests

bench: $(TEST_STAMP)
	$(BIN)/specpv-jax bench

clean:
	rm -rf $(VENV) $(NEXT) $(MIN) build *.egg-info .pytest_cache $(JAX_CACHE)

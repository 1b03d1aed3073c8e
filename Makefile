# The two commands: `make train` and `make test`. Each creates and fills .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum setup.py | cut -d' ' -f1)
WORKDIR ?= runs/deepseekmoe
CONFIG ?= configs/deepseekmoe.py
ARGS ?=
PYTEST_ARGS ?= -n 2 --dist loadgroup  # groups of tests/conftest.py: a module, or the users of one costly fixture

.PHONY: train test test-slow lint venv clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# hf: torch CPU + transformers for the HF parity tests; tpu: libtpu, for the TPU-compile tests
	$(PY) -m pip install --quiet -e '.[test,hf,tpu]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

train: $(STAMP)
	$(PY) -m moejax.train --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

# Style and the import contracts first: a formatting drift or an upward import fails fast.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache  # contracts in .importlinter

test: lint
	$(PY) -m pytest $(PYTEST_ARGS) tests

# The cases marked slow (each has a fast representative in `make test`).
test-slow: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) -m slow tests

clean:
	rm -rf runs .pytest_cache

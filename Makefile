# Two commands on a fresh machine with Python 3.11: `make run` and `make test`.
# CPU machines get the pinned CPU build of torch; GPU users see README.md ("GPU machines").
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# `make run CONFIG=my.yaml` runs the pipeline on a config file; empty: the embedded defaults.
CONFIG ?=
# Flags for `lmforge run` (e.g. RUN_FLAGS=--json: the summary as one JSON line).
RUN_FLAGS ?=
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test test-unit test-all lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,onnx,eval]"
	@touch $(STAMP)

run: install
	$(BIN)/lmforge run $(CONFIG) $(RUN_FLAGS)

# Two pytest workers: most tests wait on subprocesses and servers, so two overlap well even on a
# busy 2-core machine; the tests that share the pipeline run stay on one worker (tests/conftest.py).
test: install
	$(BIN)/python -m pytest -q -n 2

# tests/unit only: fast, no servers and no CLI subprocesses.
test-unit: install
	$(BIN)/python -m pytest -q tests/unit

test-all: install
	LMFORGE_SLOW=1 $(BIN)/python -m pytest -q -n 2

# ruff (rules in pyproject.toml) over the code and its tests, then mypy over src/, flows/, tasks/.
lint: install
	$(BIN)/ruff check src flows tasks bench tests
	$(BIN)/mypy

clean:
	rm -rf .lmforge

# Two commands on a fresh machine with Python 3.11: `make run` and `make test`.
# CPU machines get the pinned CPU build of torch; GPU users see README.md ("GPU machines").
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# Where that torch comes from: PyTorch's CPU wheel index (the default index's torch is a CUDA build, several GB).
# A torch already installed that satisfies TORCH_SPEC (a GPU machine's CUDA build) or a wheel the machine holds
# (pip's find-links, e.g. an offline wheelhouse) is taken first, without asking any index.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# The extras `make install` installs; requirements.lock pins them with the runtime dependencies.
LOCK_EXTRAS := test onnx eval structured stack deepspeed tune
# `make run CONFIG=my.yaml` runs the pipeline on a config file; empty: the embedded defaults.
CONFIG ?=
# Flags for `lmforge run` (e.g. RUN_FLAGS=--json: the summary as one JSON line).
RUN_FLAGS ?=
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-torch lock run test test-unit test-all test-slow lint clean

install: $(STAMP)

# torch first (TORCH_SPEC), then the exact versions CI tested (requirements.lock, less its torch: a GPU
# machine keeps the CUDA build it chose), then lmforge itself, editable, adding nothing the lock lacks.
# pip's own output is the progress (each package it collects, a bar per download); the quiet steps are short.
$(STAMP): pyproject.toml requirements.lock Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "make install 1/4: pip"
	$(BIN)/python -m pip install -q --upgrade pip
	@$(MAKE) --no-print-directory install-torch
	@echo "make install 3/4: the locked dependencies (requirements.lock, about 280 packages)"
	sed '/^torch==/d' requirements.lock > $(VENV)/requirements-without-torch.lock
	$(BIN)/python -m pip install --progress-bar on -r $(VENV)/requirements-without-torch.lock
	@echo "make install 4/4: lmforge (editable)"
	$(BIN)/python -m pip install -q --no-deps -e .
	@touch $(STAMP)

# TORCH_SPEC into $(VENV): installed or held locally (no index asked, hence the quiet first try), else from
# TORCH_INDEX. .ci/plain_install_check installs its fresh venv's torch through this target too.
install-torch:
	@echo "make install 2/4: $(TORCH_SPEC) (the CPU build unless one that satisfies it is installed)"
	@$(BIN)/python -m pip install -q --no-index --no-deps "$(TORCH_SPEC)" 2>/dev/null \
	  || $(BIN)/python -m pip install --progress-bar on --index-url "$(TORCH_INDEX)" "$(TORCH_SPEC)"

# Regenerates requirements.lock for Python 3.11 on Linux x86_64: the runtime dependencies and LOCK_EXTRAS,
# with the CPU build of TORCH_SPEC found in TORCH_WHEELS (uv reads no pip configuration, and PyPI's torch
# is a CUDA build). Versions already locked stay while pyproject.toml allows them; UPGRADE=1 takes the newest.
UV_SPEC ?= uv==0.13.9
TORCH_WHEELS ?= /opt/wheels
lock:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(UV_SPEC)"
	echo "$(TORCH_SPEC)" | $(BIN)/uv pip compile pyproject.toml - $(foreach extra,$(LOCK_EXTRAS),--extra $(extra)) \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --find-links $(TORCH_WHEELS) \
	  --custom-compile-command "make lock" $(if $(UPGRADE),--upgrade) --quiet -o requirements.lock

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

# Only the tests marked slow (a real 2-node Ray cluster, a killed Ray worker, whole benchmark groups...): CI runs
# them after `make test`, within its own time budget, so `make test` stays under 10 minutes.
test-slow: install
	LMFORGE_SLOW=1 $(BIN)/python -m pytest -q -n 2 -m slow

# ruff (rules in pyproject.toml) over the code and its tests, then mypy over src/, flows/, tasks/.
lint: install
	$(BIN)/ruff check src flows tasks bench tests
	$(BIN)/mypy

clean:
	rm -rf .lmforge

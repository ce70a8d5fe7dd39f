# Two entry points for a fresh machine (see README):
#   make train   - install, then run the default training job (digits, no download)
#   make test    - install, then run the test suite
PY ?= python3
ARGS ?=
# pytest-xdist workers: the suite is mostly small processes, so 2 workers on 2 cores shorten it a lot
# (tests/conftest.py splits the cores' threads between them). WORKERS=0 runs it in one process.
WORKERS ?= 2
# PEP 668: a system Python that refuses `pip install` (Debian, Ubuntu: an EXTERNALLY-MANAGED file next to its standard
# library, outside a virtual environment) gets a virtual environment in .venv, and everything here runs in it. Any
# other Python (a venv, conda, pyenv as in CI) is used as it is.
EXTERNALLY_MANAGED := $(shell $(PY) -c "import os, sys, sysconfig; print(int(sys.prefix == sys.base_prefix and os.path.isfile(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED'))))" 2>/dev/null)
ifeq ($(EXTERNALLY_MANAGED),1)
VENV := .venv
PYTHON := $(VENV)/bin/python
else
VENV :=
PYTHON := $(PY)
endif

.PHONY: install train test lint
install: $(if $(VENV),$(VENV)/bin/python)
	# torch first: a CPU machine gets the local 2.13.0 CPU build; a GPU machine keeps its own torch.
	# --no-compile: pip would byte-compile all ~20,000 .py files of the environment (wandb's 568 alone take 2 s on
	# 2 cores); Python compiles the modules a run imports, once, when it first imports them
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install --no-compile torch==2.13.0
	$(PYTHON) -m pip install --no-compile -e ".[dev,launchers]"
ifneq ($(VENV),)
	@echo "installed into $(VENV) ($(PY) is externally managed): run '. $(VENV)/bin/activate' before python src/train.py ..."
endif

.venv/bin/python:
	$(PY) -m venv .venv || { echo "error: $(PY) cannot make a virtual environment: install its venv module (Debian, Ubuntu: sudo apt install python3-venv) and run make again"; rm -rf .venv; exit 2; }

train: install
	$(PYTHON) src/train.py $(ARGS)

test: install
	$(PYTHON) -m pytest -n $(WORKERS) --dist worksteal $(ARGS)

lint:
	ruff check . && ruff format --check .

# Two entry points for a fresh machine (see README):
#   make train   - install, then run the default training job (digits, no download)
#   make test    - install, then run the test suite
PY ?= python3
ARGS ?=

.PHONY: install train test lint
install:
	# torch first: a CPU machine gets the local 2.13.0 CPU build; a GPU machine keeps its own torch.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev,launchers]"

train: install
	$(PY) src/train.py $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)

lint:
	ruff check . && ruff format --check .

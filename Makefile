# Two entry points for a fresh machine (see README):
#   make train   - install, then run the default training job (digits, no download)
#   make test    - install, then run the test suite
PY ?= python3
ARGS ?=
# pytest-xdist workers: the suite is mostly small processes, so 2 workers on 2 cores shorten it a lot
# (tests/conftest.py splits the cores' threads between them). WORKERS=0 runs it in one process.
WORKERS ?= 2

.PHONY: install train test lint
install:
	# torch first: a CPU machine gets the local 2.13.0 CPU build; a GPU machine keeps its own torch.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev,launchers]"

train: install
	$(PY) src/train.py $(ARGS)

test: install
	$(PY) -m pytest -n $(WORKERS) --dist worksteal $(ARGS)

lint:
	ruff check . && ruff format --check .

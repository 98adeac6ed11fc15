# The two README commands: `make test` and `make demo`. Both work from a clean clone: they
# create .venv, install the CPU build of torch first (an unpinned torch would pull gigabytes
# of CUDA packages), then this package with its dev extra.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
INSTALLED := $(VENV)/.installed

.PHONY: install test test-gpu lint demo clean

$(INSTALLED): setup.py pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(INSTALLED)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# CPU suite; tests marked `gpu` are deselected when CUDA is absent (tests/conftest.py).
test: lint
	OMP_NUM_THREADS=2 $(VENV)/bin/pytest --durations=15

# On a CUDA machine: the tests marked `gpu` (listed in the README).
test-gpu: $(INSTALLED)
	$(VENV)/bin/pytest -m gpu --durations=15

demo: $(INSTALLED)
	$(VENV)/bin/mmllm demo --out demo_out

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache

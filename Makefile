# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build on this machine's disk; an unpinned torch pulls CUDA.
TORCH := torch==2.13.0

.PHONY: setup demo test bench clean

$(BIN)/ncfast: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test,bench,io,harness,dask,lightning,torchmetrics]"
	touch $@

setup: $(BIN)/ncfast

demo: setup
	$(BIN)/ncfast demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info

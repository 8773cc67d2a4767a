# The README's two commands: `make demo` and `make test`. Each creates .venv and installs what it
# needs on a machine with only Python >= 3.10 and make. torch is pinned here (CPU build, installed
# first so nothing pulls the multi-GB CUDA wheels); pyproject.toml keeps the open range for users.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TORCH_PIN := torch==2.13.0

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[dev,plot]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check loratools tests benchmarks examples
	$(BIN)/mypy loratools
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/resize.py
	$(BIN)/python benchmarks/extract.py --layers 1
	$(BIN)/python benchmarks/merge.py
	$(BIN)/python benchmarks/merge_methods.py
	$(BIN)/python benchmarks/merge_quant.py
	$(BIN)/python -m benchmarks.hub

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis demo-output

# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv if missing, install, run the built-in demo
#   make test   create .venv if missing, install with test extras, run the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench docs install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/bonetumor demo --out demo_output --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=20

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

docs: $(STAMP)
	$(BIN)/python -c "from bonetumor.config import options_markdown; print(options_markdown())" > docs/options.md

bench: $(STAMP)
	$(BIN)/python benchmarks/resnet50_throughput.py

clean:
	rm -rf $(VENV) demo_output

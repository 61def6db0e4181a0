# The two commands of the README: `make demo` (the default job) and `make test` (the suite).
# Both create the virtual environment on first use. PYTHON picks the interpreter (3.10+).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install install-test clean-runs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	touch $@

$(VENV)/.cmgen: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.cmgen-test: pyproject.toml $(VENV)/.cmgen
	$(BIN)/pip install --quiet -e '.[test,lora]'
	touch $@

install: $(VENV)/.cmgen
install-test: $(VENV)/.cmgen-test

# iCT on scikit-learn's digits, CPU; re-running continues or reprints the finished run.
demo: $(VENV)/.cmgen
	$(BIN)/cmgen train ict_digits --out runs/demo --resume auto

test: $(VENV)/.cmgen-test
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

clean-runs:
	rm -rf runs/demo

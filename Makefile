# The README's two commands. Each works on a fresh machine with Python 3.11+, git and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Stage commands call `python`; put the project's environment first on PATH for DVC.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro test bench clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

repro: install          ## train and evaluate the experiment in params.yaml
	$(BIN)/dvc repro

test: install           ## the whole test suite
	$(BIN)/python -m pytest

bench: install          ## optlab's training speed against the plain Keras recipe
	$(BIN)/python benchmarks/train_speed.py

clean-venv:
	rm -rf $(VENV)

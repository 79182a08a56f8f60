# The two commands: `make run` (whole pipeline) and `make test` (test suite), each on a fresh machine.
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
PYTHON ?= python3

# Stop albumentations' update check and DVC's analytics from reaching the network.
export NO_ALBUMENTATIONS_UPDATE := 1
export DVC_NO_ANALYTICS := 1
# Stage commands in dvc.yaml call `python`: the venv's.
export PATH := $(BIN):$(PATH)

.PHONY: run test lint bench clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/dvc repro

test: $(VENV)/.installed lint
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python scripts/bench.py

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV)

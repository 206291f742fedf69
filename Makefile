# The two set-up commands of the README. Both create .venv on first use (torch's CPU wheel
# first, so pip never pulls a multi-GB CUDA build), then run.
VENV ?= .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench docs
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# The whole pipeline on the embedded default: prepare -> train-teacher -> precompute ->
# distill (+ labels-only baseline, FastBERT branches) -> evaluate, then the results side by side.
demo: setup
	PATH=$(abspath $(BIN)):$$PATH dvc repro
	$(BIN)/kd report

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/cache_io.py

# The documentation site (mkdocs.yml, docs/) into build/site; fails on a stale docs/params.md or a broken link.
docs: setup
	$(BIN)/python docs/gen_params.py --check
	$(BIN)/mkdocs build --strict

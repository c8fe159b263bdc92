# Set-up and day-to-day commands. Everything installs into .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint bench clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: the pinned release is a CPU build that pip finds locally;
	# an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,parquet]'
	touch $@

demo: install
	$(VENV)/bin/merge-mix demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check merge_mix tests benchmarks
	$(VENV)/bin/ruff format --check merge_mix tests benchmarks

clean-demo:
	rm -rf pools/demo runs/demo

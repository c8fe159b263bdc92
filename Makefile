# Set-up and day-to-day commands. Everything installs into .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

TORCH := torch==2.13.0
CONSTRAINTS := constraints.txt

.PHONY: install constraints demo test lint bench clean-demo

install: $(VENV)/.installed

# Every package comes at the exact version in constraints.txt (pip and setuptools too, also as
# the build backend of merge-mix and of the sdist-only dependencies), so an install today and
# one next month give the same environment. pyproject.toml keeps the ranges.
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) --upgrade pip
	# torch first: the pinned release is a CPU build that pip finds locally;
	# an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) $(TORCH)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) --build-constraint $(CONSTRAINTS) -e '.[dev,parquet]'
	touch $@

# Rebuild constraints.txt from the newest releases that fit pyproject.toml: the same installs
# as above without constraints, in a throwaway venv, then pip freeze. Review the diff, run
# `make test`, commit.
constraints:
	@set -eu; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; py="$$tmp/venv/bin/python"; \
	echo "installing into a throwaway venv ($$tmp)"; \
	"$$py" -m pip install --quiet --upgrade pip; \
	"$$py" -m pip install --quiet $(TORCH); \
	"$$py" -m pip install --quiet -e '.[dev,parquet]'; \
	{ \
	echo "# Exact versions of every package \`make install\` puts into .venv: $(TORCH) (local"; \
	echo "# version tag such as +cpu dropped), merge-mix's dependencies with the dev and parquet"; \
	echo "# extras, transitive ones included, and pip and setuptools. pyproject.toml keeps the"; \
	echo "# ranges, for users installing merge-mix into their own environments."; \
	echo "# Resolved with Python $$("$$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])'); some pins need that Python or newer."; \
	echo "# Generated: do not edit by hand. To refresh: make constraints"; \
	"$$py" -m pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]+)[+].*/\1/'; \
	} > "$$tmp/constraints.txt"; \
	grep -q '^torch==' "$$tmp/constraints.txt"; grep -q '^pip==' "$$tmp/constraints.txt"; \
	cp "$$tmp/constraints.txt" $(CONSTRAINTS); \
	echo "wrote $(CONSTRAINTS) ($$(grep -c '==' $(CONSTRAINTS)) pins)"

demo: install
	$(VENV)/bin/merge-mix demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check merge_mix tests benchmarks
	$(VENV)/bin/ruff format --check merge_mix tests benchmarks

clean-demo:
	rm -rf pools/demo runs/demo

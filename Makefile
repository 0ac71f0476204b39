# Two commands: `make demo` (set up, then run every stage on the embedded dataset) and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# clip-retrieval's own venv (benchmarks/peer_venv.py): clip-retrieval --no-deps over this venv's packages, for the
# tokenize benchmark and the test that serves an export through `clip-retrieval back` (tests reach no registry).
PEER_STAMP := benchmarks/.peer-venv/.bench-packages
# open_clip imports torchvision, and PyPI has no CPU-only torchvision wheel for x86_64: on a CPU machine the pair
# below is the one that imports (it runs on the CPU; see README "Installing torch"). Override for another build,
# e.g. make TORCH_SPEC="torch torchvision" TORCH_INDEX="--index-url <your CPU wheel index>".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX ?=
# Dev tools whose metadata pins what this venv outgrew, installed without their pins. autofaiss 2.18 (the test of the
# retrieval export builds its index) declares numpy<2 and fire<0.7, yet builds and searches fine under numpy 2 (the
# test proves it); what it imports (faiss-cpu, embedding-reader, fire, pandas, pyarrow, fsspec) is in the deps above.
NODEPS_DEV ?= autofaiss==2.18.0
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: setup browser demo test lint bench lock clean

setup: $(STAMP) $(PEER_STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
	$(BIN)/pip install -q $(TORCH_INDEX) $(TORCH_SPEC)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/pip install -q --no-deps -c constraints.txt $(NODEPS_DEV)
	@touch $(STAMP)

$(PEER_STAMP): benchmarks/peer_venv.py $(STAMP)
	$(BIN)/python benchmarks/peer_venv.py

# The report test renders report.html in a real headless chromium (Debian's package; a no-op when present).
browser:
	@.ci/install-chromium.sh

demo: setup
	$(BIN)/python -m pipeline demo --config configs/demo.yaml

test: setup browser
	$(BIN)/ruff check pipeline jobs tests benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=40 tests

lint: setup
	$(BIN)/ruff check pipeline jobs tests benchmarks

bench: setup
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

lock: setup
	$(BIN)/pip freeze --exclude-editable | sed '1i # Versions CI and `make` install (pip -c): the set the tests last passed with. Regenerate with `make lock`.' > constraints.txt

clean:
	rm -rf runs .pytest_cache

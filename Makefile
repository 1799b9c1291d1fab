# The two commands:  make demo  (main job on the embedded demo crawl)  and  make test.
# Both create .venv and install what they need on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# torch: 2.13.0 from the package index. On Linux x86_64 with a GPU this is a CUDA build;
# set TORCH_SPEC="" after installing a specific torch build yourself (see README, "GPU").
TORCH_SPEC ?= torch==2.13.0
export DAGSTER_HOME ?= $(abspath .dsdm/dagster_home)
CRAWL ?= demo
CONFIG ?= configs/demo.yaml

.PHONY: install demo test lint dev bench-corpus clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)")
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

$(DAGSTER_HOME)/dagster.yaml:
	mkdir -p $(DAGSTER_HOME)
	printf 'telemetry:\n  enabled: false\n' > $@

demo: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dsdm check-config $(CONFIG)
	$(BIN)/dsdm add-crawl $(CRAWL)
	$(BIN)/dagster job execute -m dsdm_assets.definitions -j selection_job -c $(CONFIG) \
		--tags '{"dagster/partition": "$(CRAWL)"}'
	$(BIN)/dsdm report $(CRAWL)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

dev: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev

bench-corpus: install
	$(BIN)/python scripts/build_corpus.py --size bench

clean:
	rm -rf .dsdm

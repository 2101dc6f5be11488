# `make demo` and `make test` work from a fresh clone with Python 3.11 and the package registries.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNNER := --runner=FnApiRunner
DEMO := out/demo

.PHONY: venv demo lint test test-fast bench poisoning clean

venv: $(VENV)/.installed

# Pinned builds (torch, Beam) come from constraints.txt, as in templates/Dockerfile.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch torchvision
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# --overwrite: a demo run replaces the last one's tables (out/demo belongs to the demo)
demo: venv
	$(BIN)/anchorscan fit $(RUNNER) --input demo/data/fit/real --input demo/data/fit/extra \
	    --anchor $(DEMO)/anchor.safetensors --calibration_fraction 0.25 --calibration_group '([^/]+)__x'
	$(BIN)/anchorscan info $(DEMO)/anchor.safetensors
	$(BIN)/anchorscan score $(RUNNER) --input demo/data/scan/manifest.csv \
	    --anchor $(DEMO)/anchor.safetensors --output $(DEMO)/scan --overwrite
	$(BIN)/python demo/summarize.py --scores $(DEMO)/scan --manifest demo/data/scan/manifest.csv
	@echo "--- a closed-form LDA probe fitted on half the scenes, evaluated on the other half"
	$(BIN)/anchorscan fit-head $(RUNNER) --kind lda --real demo/data/scan/head_train_real.txt \
	    --fake demo/data/scan/head_train_fake.txt --output $(DEMO)/lda.safetensors
	$(BIN)/anchorscan evaluate $(RUNNER) --dataset manifest demo/data/scan/head_eval.csv \
	    --anchor $(DEMO)/anchor.safetensors --output $(DEMO)/eval-anchor
	$(BIN)/anchorscan evaluate $(RUNNER) --dataset manifest demo/data/scan/head_eval.csv \
	    --anchor $(DEMO)/anchor.safetensors --head $(DEMO)/lda.safetensors --output $(DEMO)/eval-lda
	$(BIN)/anchorscan report --scores $(DEMO)/scan --anchor $(DEMO)/anchor.safetensors \
	    --labels demo/data/scan/manifest.csv --output $(DEMO)/report.html
	@echo "--- curating a scraped dataset: img2dataset's shards in, filtered shards out (README)"
	$(BIN)/anchorscan score $(RUNNER) --input 'demo/data/shards/{00000..00002}.tar' \
	    --anchor $(DEMO)/anchor.safetensors --output $(DEMO)/shards/scan --overwrite
	$(BIN)/anchorscan curate $(RUNNER) --scores $(DEMO)/shards/scan --output $(DEMO)/shards/curated \
	    --reshard --samples_per_shard 25 --overwrite

# Lint, format, the import layers (templates > pipelines > transforms > anchors), types. mypy
# checks the package as it is installed: a tree of links names the folders anchorscan.*.
TYPECHECK := build/typecheck
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	mkdir -p $(TYPECHECK)/anchorscan
	for d in anchors transforms pipelines templates; do ln -sfn $(CURDIR)/$$d $(TYPECHECK)/anchorscan/$$d; done
	cd $(TYPECHECK) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p anchorscan

# The whole suite, as CI runs it; the import layers first (pipelines > transforms > anchors).
test: venv lint
	$(BIN)/python -m pytest -q

# Development loop: everything but the tests marked slow (pipelines running the backbone).
test-fast: venv lint
	$(BIN)/python -m pytest -q -m "not slow"

# Throughput of every stage against the bare forward pass, the backbones against their FLOPs,
# online updates against full re-derivations and a delta's size, shards against folders and the
# memory of scanning a 1 GB shard.
bench: venv
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/forward_backends.py
	$(BIN)/python benchmarks/backbones.py
	$(BIN)/python benchmarks/online_update.py
	$(BIN)/python benchmarks/shards.py
	$(BIN)/python benchmarks/fit_speed.py

# The poisoning measurement of docs/QUALITY.md (about 30 minutes): the development bench is not in
# the repository, so give its folder: make poisoning BENCH=../shared/bench/dev
poisoning: venv
	$(BIN)/python benchmarks/poisoning.py --bench $(BENCH) --output out/poisoning

clean:
	rm -rf $(DEMO) .pytest_cache

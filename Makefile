# Two commands on a fresh machine:  `make demo` (set up, then run the whole workflow on the demo data)
# and `make test` (set up, then run the tests). Both create .venv once.
PYTHON ?= python3.11
VENV ?= .venv
# The CPU build here; on a GPU machine use e.g. `make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH ?= torch==2.13.0
CORES ?= 2
# pytest-xdist workers for `make test` (each test uses one torch thread; the workflow tests run Snakemake on 2 cores)
TEST_WORKERS ?= 2
BIN := $(VENV)/bin

.PHONY: setup demo demo-figures test test-fast dag lint docs clean slurm-up slurm-down

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: setup
	PATH=$(abspath $(BIN)):$$PATH snakemake --cores $(CORES)

# The README's demo pictures and figures: run the demo (nothing to do when it is finished), copy them to docs/demo/.
demo-figures: demo
	mkdir -p docs/demo
	cp results/diffusion/demo_unet_tiny/eval_samples/grid.png docs/demo/diffusion_grid.png
	cp results/evaluation/diffusion/demo_unet_tiny/grid.png docs/demo/diffusion_judged.png
	cp results/evaluation/controlnet/demo_controlnet_concat/grid.png docs/demo/controlnet_grid.png
	cp results/evaluation/summary.csv docs/demo/summary.csv
	cp $$(ls results/autoencoder/demo_kl_c4_f4/samples/epoch_*.png | tail -n 1) docs/demo/autoencoder.png

test: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test-fast: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow"

dag: setup
	PATH=$(abspath $(BIN)):$$PATH snakemake --dag | dot -Tsvg > dag.svg

# The one-node SLURM cluster the `slurm` tests run on (root; apt-get install slurm-wlm munge). CI starts it.
slurm-up:
	tests/cluster/slurm_up.sh

slurm-down:
	tests/cluster/slurm_down.sh

lint: setup
	$(BIN)/ruff check src tests workflow_scripts benchmarks
	$(BIN)/snakefmt --check Snakefile rules/
	PATH=$(abspath $(BIN)):$$PATH snakemake --lint

# The docs site (mkdocs-material) into site/; --strict: a broken link, a missing page or anchor fails the build.
# Its configuration reference comes from `ldmflow schemas` (config/schemas/*.schema.md, kept current by a test).
docs: setup
	PATH=$(abspath $(BIN)):$$PATH mkdocs build --strict

clean:
	rm -rf results logs .snakemake dag.svg site

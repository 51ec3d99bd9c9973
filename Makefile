# Set-up and everyday commands. `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN_DIR ?= runs/default

export FLWR_TELEMETRY_ENABLED := 0
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1

.PHONY: run test bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default data (until the federated engine lands: the default
# synthetic dataset and its card).
run: $(STAMP)
	$(BIN)/cxrfl synth --out $(RUN_DIR)/data --n 2000 --sites 4 --size 256 --seed 0
	@echo "results: $(abspath $(RUN_DIR))/data (dataset.json is its card)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/data_io.py --quick
	$(BIN)/python benchmarks/partition.py
	$(BIN)/python benchmarks/train_step.py --quick

clean:
	rm -rf runs plans .pytest_cache

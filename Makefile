# Set-up and everyday commands. `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN_DIR ?= runs/default

export FLWR_TELEMETRY_ENABLED := 0
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1

.PHONY: run test bench install clean real-study real-benchmark

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default data: phantoms, then federated segmentation and
# classification on Flower's Ray engine. Prints the run folders.
run: $(STAMP)
	$(BIN)/cxrfl simulate

# The real-hospital study (Montgomery + Shenzhen from ../shared/data/lungseg_mc_sz): ingest,
# segmentation (pooled, local-only, federated), mask, classification full vs masked, Grad-CAM,
# runs/studies/real_hospitals/report.md. Rerun to continue an interrupted study.
real-study: $(STAMP)
	$(BIN)/cxrfl study tune_configs/real_hospitals.yaml

# Issue 15's benchmark on the two real hospitals: pooled, local-only, FedAvg, FedBN, SCAFFOLD
# (runs/benchmarks/benchmark_real/benchmark.md). Rerun to continue an interrupted benchmark.
real-benchmark: $(STAMP)
	test -f data/lungseg/dataset.json || $(BIN)/cxrfl ingest manifest ../shared/data/lungseg_mc_sz/montgomery \
		../shared/data/lungseg_mc_sz/shenzhen --out data/lungseg --max-size 256 --quiet
	$(BIN)/cxrfl benchmark tune_configs/benchmark_real.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25

bench: $(STAMP)
	$(BIN)/python benchmarks/data_io.py --quick
	$(BIN)/python benchmarks/partition.py
	$(BIN)/python benchmarks/train_step.py --quick
	$(BIN)/python benchmarks/engine_overhead.py --quick
	$(BIN)/python benchmarks/message_cost.py --quick
	$(BIN)/python benchmarks/versus_flower.py --quick
	$(BIN)/python benchmarks/straightforward.py --quick
	$(BIN)/python benchmarks/sweep_packing.py --quick
	$(BIN)/python benchmarks/population.py --quick
	$(BIN)/python benchmarks/privacy.py --quick
	$(BIN)/python benchmarks/system_clock.py --quick

clean:
	rm -rf runs plans .pytest_cache

# On a machine with a GPU (a GPU session's one command): train_step and gpu_packing with
# --device cuda in under 8 minutes; outputs also to $OUT when set.
.PHONY: bench-gpu
bench-gpu:
	bash benchmarks/gpu_check.sh

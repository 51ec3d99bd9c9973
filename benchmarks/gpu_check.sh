#!/usr/bin/env bash
# The GPU session's one prepared command (repo root, a machine with one GPU), under 9 minutes:
#   bash benchmarks/gpu_check.sh        (or: make bench-gpu)
# nvidia-smi; train_step.py --device cuda --quick (images/s and peak GPU memory per client of
# each model at its paper size); versus_flower.py --quick on the GPU (resnet50 at 224 px, 8
# clients packed: clients/s of ours against stock Flower, issue 19); gpu_packing.py --device cuda
# (clients packed per GPU) with the time that is left as its hard budget. Logs and the updated BENCHMARKS.md go to $OUT when set.
# Python packages missing on the machine can come as wheels in .whl/ (installed to /tmp/site).
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT_S=${GPU_CHECK_LIMIT_S:-540}
out=${OUT:-/tmp/cxrfl-gpu-check}
mkdir -p "$out"
start=$(date +%s)
export PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0 WANDB_MODE=disabled HF_HUB_OFFLINE=1
PY=python3
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python; fi
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{ nvidia-smi; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 \
  | tee "$out/nvidia-smi.txt"
if ! $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: torch sees no CUDA device" | tee "$out/error.txt"
  exit 2
fi
missing=$($PY -c "
import importlib.util as u
print(' '.join(m for m in ['torch', 'flwr', 'ray', 'segmentation_models_pytorch', 'timm', 'pydantic', 'yaml',
                           'pyarrow', 'safetensors'] if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
  echo "gpu_check: missing Python packages: $missing (carry them as wheels in .whl/)" | tee "$out/error.txt"
  exit 2
fi

timeout 120 $PY benchmarks/train_step.py --device cuda --quick 2>&1 | tee "$out/train_step.log"
timeout 200 $PY benchmarks/versus_flower.py --quick --device cuda --model resnet50 --size 224 --packed 8 2>&1 \
  | tee "$out/versus_flower.log"
# gpu_packing's own watchdog fires 30 s after its budget; leave that and its start and exit.
left=$(( LIMIT_S - ($(date +%s) - start) ))
timeout "$left" $PY benchmarks/gpu_packing.py --device cuda --budget-s $(( left - 60 )) 2>&1 | tee "$out/gpu_packing.log"
rc=$?
cp BENCHMARKS.md "$out/"
echo "gpu_check: done in $(( $(date +%s) - start )) s (gpu_packing exit $rc)"
exit $rc

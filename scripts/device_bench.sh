#!/usr/bin/env bash
# One GPU call for every device measurement (issues 3, 4, 5), each under its own time limit,
# logs to $OUT (or ./device-logs). Run from the repository root on the GPU machine:
#   bash scripts/device_bench.sh
set -uo pipefail
OUT=${OUT:-device-logs}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}
step model_jax 190 python3 scripts/bench_model.py --points reference --methods full,ia3 --warmup 3 --iters 10
step model_torch 100 python3 scripts/bench_model_torch.py --points reference --methods full --warmup 2 --iters 5
step runs 130 python3 scripts/bench_runs.py --synthetic --model-size t5-base --method ia3 --runs 32 \
  --batch 8 --n-test 100 --steps 10 --dtype bfloat16 --variants together,nolog,baseline
step tracin 110 python3 scripts/bench_tracin.py --preset t5-base --input-len 256 --target-len 4 \
  --n-train 1000 --n-test 100 --checkpoints 10 --chunk-size 64 --torch-examples 100 \
  --full-n-train 0 --json "$OUT/bench_tracin_ia3.json"

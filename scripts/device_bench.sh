#!/usr/bin/env bash
# Device measurements for issues 3, 4 and 5 in one call, each step under its own time limit,
# logs to $OUT (or ./device-logs). Run from the repository root on the GPU machine:
#   bash scripts/device_bench.sh [STAGE...]   STAGE: model, model_unroll, runs, tracin (default: model)
# Limits per stage: model 110 + 300 s, model_unroll 320 s, runs 200 + 120 s, tracin 110 s. One
# device call may run 600 s, so give one or two stages per call (e.g. `model`, then `runs tracin`).
set -uo pipefail
OUT=${OUT:-device-logs}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
STAGES=${*:-model}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>"$OUT/$name.err" | tee "$OUT/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s; last stderr: $(grep -v Warning "$OUT/$name.err" | tail -n 1)"
}
for stage in $STAGES; do
  case $stage in
  model)
    # The issue's 5 reference points, PyTorch baseline first (same call), then the Flax T5 with
    # scanned and unrolled layers, each point in its own process under a 60 s limit.
    step model_torch 110 python3 scripts/bench_model_torch.py --points reference --methods full \
      --warmup 2 --iters 5
    step model_jax 300 python3 scripts/bench_model.py --points reference --methods full \
      --layers scan --warmup 2 --iters 5 --point-timeout 55
    ;;
  model_unroll)
    # The same points with unrolled layers (no while loop: XLA may capture whole steps in CUDA
    # graphs); compare with the scan rows of the `model` stage.
    step model_jax_unroll 320 python3 scripts/bench_model.py --points reference --methods full \
      --layers unroll --warmup 2 --iters 5 --point-timeout 60
    ;;
  runs)
    # T5-base IA3, 32 runs x batch 8, 100 tracked examples logged every step (issue 4 protocol).
    step runs_cudnn 200 python3 scripts/bench_runs.py --synthetic --model-size t5-base --method ia3 \
      --runs 32 --batch 8 --n-test 100 --steps 5 --dtype bfloat16 --attention cudnn \
      --train-groups 4 --variants together,nolog
    step runs_einsum 120 python3 scripts/bench_runs.py --synthetic --model-size t5-base --method ia3 \
      --runs 32 --batch 8 --n-test 100 --steps 5 --dtype bfloat16 --attention einsum \
      --variants together,baseline
    ;;
  tracin)
    step tracin 110 python3 scripts/bench_tracin.py --preset t5-base --input-len 256 --target-len 4 \
      --n-train 1000 --n-test 100 --checkpoints 10 --chunk-size 64 --torch-examples 100 \
      --full-n-train 0 --json "$OUT/bench_tracin_ia3.json"
    ;;
  *) echo "unknown stage $stage (model, model_unroll, runs, tracin)"; exit 2 ;;
  esac
done

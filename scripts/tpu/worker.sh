#!/usr/bin/env bash
# Runs ON each Cloud TPU VM worker; scripts/tpu/submit.sh calls it (`tpu-vm ssh --worker=all`).
#
#   worker.sh setup [--libtpu-index URL]
#       Python >= 3.11 (apt-get python3.11 when the image has none), .venv in the project folder,
#       `pip install -e '.[finetune]' 'jax[tpu]' -f URL`, and the Makefile's install stamp, so that
#       `make TARGET` uses this environment instead of installing the CPU one.
#   worker.sh run --target T --config runs/<name> --out DIR [--make-var KEY=VALUE]...
#       `make T CONFIG=... OUT=...` with SIMFLUENCE_DISTRIBUTED=1 (every worker joins one JAX job
#       through finetune.distributed.initialize) and the hub online. --out gs://...: the bucket's
#       copy is pulled first (so finished work is skipped), the target writes to
#       ~/simfluence-out/<name>, and worker 0 pushes it back when the target ends, even on failure.
set -euo pipefail

PROG=scripts/tpu/worker.sh
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

_python() { # the first interpreter >= 3.11, installing python3.11 when there is none
  local p
  for p in python3.13 python3.12 python3.11 python3; do
    if command -v "$p" >/dev/null 2>&1 &&
      "$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$p"
      return
    fi
  done
  sudo apt-get update -q >&2
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3.11 python3.11-venv >&2
  echo python3.11
}

_worker_id() { # TPU_WORKER_ID, else the metadata server's agent-worker-number, else 0
  if [[ -n ${TPU_WORKER_ID:-} ]]; then
    echo "$TPU_WORKER_ID"
    return
  fi
  curl -sf -m 5 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number ||
    echo 0
}

setup() {
  local index=https://storage.googleapis.com/jax-releases/libtpu_releases.html
  while (($#)); do
    case "$1" in
      --libtpu-index) index=${2:?--libtpu-index needs a URL} && shift 2 ;;
      *) die "setup: unknown argument '$1'" ;;
    esac
  done
  cd "$REPO"
  if ! command -v make >/dev/null 2>&1; then
    sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q make
  fi
  local py
  py=$(_python)
  [[ -x .venv/bin/python ]] || "$py" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[finetune]' 'jax[tpu]' -f "$index"
  touch .venv/.installed
  .venv/bin/python -c 'import jax; print("worker ready:", jax.__version__)'
}

run() {
  local target="" config="" out="" make_vars=()
  while (($#)); do
    case "$1" in
      --target) target=${2:-} && shift 2 ;;
      --config) config=${2:-} && shift 2 ;;
      --out) out=${2:-} && shift 2 ;;
      --make-var) make_vars+=("${2:-}") && shift 2 ;;
      *) die "run: unknown argument '$1'" ;;
    esac
  done
  [[ -n $target && -n $config && -n $out ]] || die "run needs --target, --config and --out"
  cd "$REPO"
  [[ -e $config ]] || die "unknown config '$config' in $REPO"
  export SIMFLUENCE_DISTRIBUTED=1
  local dest=$out
  if [[ $out == gs://* ]]; then
    # One staging folder per bucket path, not per config: a new --out starts from what that path
    # holds (nothing, when it is new), never from another experiment staged on this worker.
    dest="$HOME/simfluence-out/$(printf '%s' "$out" | sha256sum | cut -c1-16)"
    mkdir -p "$dest"
    if gcloud storage ls "$out" >/dev/null 2>&1; then
      gcloud storage rsync --recursive "$out" "$dest"
    fi
  fi
  local rc=0
  make "$target" "CONFIG=$config" "OUT=$dest" VENV=.venv PYTHON=.venv/bin/python \
    HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 "${make_vars[@]}" || rc=$?
  if [[ $out == gs://* && "$(_worker_id)" == 0 ]]; then
    gcloud storage rsync --recursive "$dest" "$out" || rc=$((rc ? rc : 1))
  fi
  return "$rc"
}

case "${1:-}" in
  setup | run)
    cmd=$1
    shift
    "$cmd" "$@"
    ;;
  *) die "usage: worker.sh setup [--libtpu-index URL] | run --target T --config C --out DIR" ;;
esac

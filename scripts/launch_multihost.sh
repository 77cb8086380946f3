#!/usr/bin/env bash
# Start one `finetune` process per host and/or per GPU, joined into one JAX job.
#
#   scripts/launch_multihost.sh [--hosts h1,h2,...] [--gpus 0,1,...] \
#       [--coordinator-address HOST:PORT | --port 12355] [--remote-dir DIR] [--python PY] \
#       [--env KEY=VALUE]... [--dry-run] -- run CONFIG [finetune run flags...]
#
# --hosts: one process per host over ssh (hosts listed in process order; the first is the
#          coordinator unless --coordinator-address says otherwise), run in --remote-dir
#          (default: this checkout's path, e.g. on a shared file system) with its .venv
#          (--python, default .venv/bin/python there, $REPO/.venv/bin/python locally).
# --gpus:  one process per listed GPU, pinned with CUDA_VISIBLE_DEVICES; alone, on this machine
#          (coordinator localhost:PORT); with --hosts, on every host (process id =
#          host index * number of GPUs + GPU index).
# After `--` comes the finetune command line (`run CONFIG ...`, or `tracin EXP`); each process runs
#   PY -m finetune.cli --coordinator-address A --num-processes N --process-id I <that>
# (the finetune CLI takes these flags before the subcommand and passes them to
# finetune.distributed.initialize, which calls jax.distributed.initialize).
# The processes run in parallel; when one fails the others are stopped (with --hosts: the local
# ssh clients; the remote processes end when JAX's heartbeat misses the failed one) and its exit
# code is returned. --dry-run prints one command per process and runs nothing.
# Bad input: a one-line error and exit code 2.
# On Slurm, Open MPI or a Cloud TPU VM this script is not needed: `finetune run` detects them.
set -euo pipefail

PROG=scripts/launch_multihost.sh
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() {
  echo "$PROG: error: $*" >&2
  exit 2
}
usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

hosts_csv="" gpus_csv="" coordinator="" port=12355 remote_dir=$REPO python=""
envs=() dry_run=0
while (($#)); do
  case "$1" in
    --hosts | --gpus | --coordinator-address | --port | --remote-dir | --python | --env)
      (($# >= 2)) || die "$1 needs a value (see --help)"
      case "$1" in
        --hosts) hosts_csv=$2 ;;
        --gpus) gpus_csv=$2 ;;
        --coordinator-address) coordinator=$2 ;;
        --port) port=$2 ;;
        --remote-dir) remote_dir=$2 ;;
        --python) python=$2 ;;
        --env)
          [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$2' is not KEY=VALUE"
          envs+=("$2")
          ;;
      esac
      shift 2
      ;;
    --dry-run) dry_run=1 && shift ;;
    -h | --help) usage && exit 0 ;;
    --) shift && break ;;
    *) die "unknown argument '$1'; put the finetune run arguments after '--' (see --help)" ;;
  esac
done
run_args=("$@")

((${#run_args[@]})) || die "missing '-- run CONFIG [finetune run flags]' after the launcher's flags"
[[ ${run_args[0]} =~ ^[a-z]+$ ]] ||
  die "'${run_args[0]}' is not a finetune subcommand; write '-- run CONFIG [flags]' (see --help)"
for arg in "${run_args[@]}"; do
  case "$arg" in
    --coordinator-address* | --num-processes* | --process-id*)
      die "'$arg' is set by the launcher; remove it (use --coordinator-address/--port here)"
      ;;
  esac
done
[[ -n $hosts_csv || -n $gpus_csv ]] || die "give --hosts h1,h2,... and/or --gpus 0,1,..."
hosts=() gpus=()
if [[ -n $hosts_csv ]]; then
  IFS=, read -r -a hosts <<<"$hosts_csv"
  for h in "${hosts[@]}"; do
    [[ $h =~ ^[A-Za-z0-9_.@:-]+$ ]] || die "--hosts: '$h' is not a host name (from '$hosts_csv')"
  done
fi
if [[ -n $gpus_csv ]]; then
  IFS=, read -r -a gpus <<<"$gpus_csv"
  for g in "${gpus[@]}"; do
    [[ $g =~ ^[0-9]+$ ]] || die "--gpus: '$g' is not a GPU index (from '$gpus_csv')"
  done
fi
[[ $port =~ ^[0-9]+$ ]] && ((port > 0 && port < 65536)) || die "--port '$port' is not 1..65535"
if [[ -z $coordinator ]]; then
  if ((${#hosts[@]})); then
    first=${hosts[0]##*@} # user@host -> host
    coordinator="$first:$port"
  else
    coordinator="localhost:$port"
  fi
fi
[[ $coordinator =~ ^[^[:space:]:]+:[0-9]+$ || $coordinator =~ ^\[[0-9A-Fa-f:]+\]:[0-9]+$ ]] ||
  die "--coordinator-address '$coordinator' is not HOST:PORT"

n_hosts=${#hosts[@]}
if [[ -z $python ]]; then # the project's virtualenv: this checkout's, or remote-dir's on hosts
  if ((n_hosts)); then python=.venv/bin/python; else python=$REPO/.venv/bin/python; fi
fi
n_gpus=${#gpus[@]}
slots=$((n_gpus ? n_gpus : 1))
num_processes=$((n_hosts ? n_hosts * slots : slots))

# The command of process $1 running GPU $2 ("" for all of the host's devices), as an array.
process_command() {
  local id=$1 gpu=$2
  cmd=(env)
  [[ -z $gpu ]] || cmd+=("CUDA_VISIBLE_DEVICES=$gpu")
  cmd+=(${envs[@]+"${envs[@]}"} "$python" -m finetune.cli --coordinator-address "$coordinator"
    --num-processes "$num_processes" --process-id "$id" "${run_args[@]}")
}

pids=()
stop_all() {
  if ((${#pids[@]})); then
    kill "${pids[@]}" 2>/dev/null || true # some have already ended
  fi
}
trap 'stop_all; exit 130' INT TERM

quote_line() { # a command as one line that a shell reads back as the same words
  local word line=""
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
      line+=" $word"
    elif [[ $word != *"'"* ]]; then
      line+=" '$word'"
    else
      printf -v word '%q' "$word"
      line+=" $word"
    fi
  done
  echo "${line# }"
}

launch() { # print the command of one process; start it in the background unless --dry-run
  echo "+ $(quote_line "$@")"
  if ((!dry_run)); then
    "$@" &
    pids+=($!)
  fi
}

for ((h = 0; h < (n_hosts ? n_hosts : 1); h++)); do
  for ((s = 0; s < slots; s++)); do
    id=$((h * slots + s))
    process_command "$id" "${gpus[s]:-}"
    if ((n_hosts)); then
      printf -v remote '%q ' "${cmd[@]}"
      if [[ $remote_dir == "~/"* ]]; then # keep ~ expandable on the host
        printf -v remote 'cd ~/%q && %s' "${remote_dir#"~/"}" "${remote% }"
      else
        printf -v remote 'cd %q && %s' "$remote_dir" "${remote% }"
      fi
      launch ssh -o BatchMode=yes "${hosts[h]}" "$remote"
    else
      launch "${cmd[@]}"
    fi
  done
done
((dry_run)) && exit 0

rc=0
for ((k = 0; k < ${#pids[@]}; k++)); do
  if wait -n; then
    continue
  else
    code=$?
    ((rc)) || rc=$code
    stop_all
  fi
done
exit "$rc"

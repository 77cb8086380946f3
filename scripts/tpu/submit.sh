#!/usr/bin/env bash
# Run a make target of this project on every worker of a Cloud TPU VM (one host or a pod slice).
#
#   scripts/tpu/submit.sh --tpu NAME --zone ZONE --config runs/<name> --out gs://BUCKET/PATH \
#       [--target runs] [--accelerator-type v4-8] [--version tpu-ubuntu2204-base] [--create] \
#       [--project P] [--make-var KEY=VALUE]... [--detach] [--dry-run]
#
# Steps (each a command, printed; --dry-run prints them all, runs none and needs no gcloud):
#   1. describe the TPU VM; reuse it if it is READY, create it if absent and --create is given;
#   2. pack the project (`git archive` of HEAD plus uncommitted changes to tracked files) and
#      copy it to every worker (`tpu-vm scp --worker=all`);
#   3. on every worker: unpack, install the project with the TPU build of jax
#      (scripts/tpu/worker.sh setup);
#   4. on every worker at once: `make TARGET CONFIG=... OUT=...` (scripts/tpu/worker.sh run), with
#      SIMFLUENCE_DISTRIBUTED=1 so that finetune.distributed.initialize() calls
#      jax.distributed.initialize() and the workers of a pod slice form one JAX job.
# --detach: step 4 runs under nohup on the workers (log: ~/simfluence-TARGET.log) and this script
# returns at once; running it again resumes, as the make targets skip finished work.
# --out gs://... : workers write to a local folder, pull the bucket's copy first (resume) and
# worker 0 pushes the results back when the target ends (also when it fails). Any other --out is
# passed to make as is (a path that every worker sees, e.g. a Filestore/NFS mount).
# Bad input (no TPU name or zone, gcloud absent, unknown or untracked config, a TPU that is absent
# without --create) stops with a one-line error and exit code 2 before anything is created.
set -euo pipefail

PROG=scripts/tpu/submit.sh
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
REMOTE_DIR=simfluence                # on each worker, relative to the home folder
REMOTE_TARBALL=simfluence-src.tar.gz # likewise
LIBTPU_INDEX=https://storage.googleapis.com/jax-releases/libtpu_releases.html

die() { # one-line error, exit code 2
  echo "$PROG: error: $*" >&2
  exit 2
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

tpu="" zone="" project="" config="" out="" target=runs
accelerator=v4-8 accelerator_given=0 version=tpu-ubuntu2204-base
create=0 dry_run=0 detach=0 make_vars=()
while (($#)); do
  case "$1" in
    --tpu | --zone | --project | --config | --out | --target | --accelerator-type | --version | \
      --make-var)
      (($# >= 2)) || die "$1 needs a value (see --help)"
      case "$1" in
        --tpu) tpu=$2 ;;
        --zone) zone=$2 ;;
        --project) project=$2 ;;
        --config) config=$2 ;;
        --out) out=$2 ;;
        --target) target=$2 ;;
        --accelerator-type) accelerator=$2 accelerator_given=1 ;;
        --version) version=$2 ;;
        --make-var)
          [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--make-var '$2' is not KEY=VALUE"
          make_vars+=("$2")
          ;;
      esac
      shift 2
      ;;
    --create) create=1 && shift ;;
    --dry-run) dry_run=1 && shift ;;
    --detach) detach=1 && shift ;;
    -h | --help) usage && exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ -n $tpu ]] || die "missing --tpu NAME (the Cloud TPU VM to create or reuse)"
[[ -n $zone ]] || die "missing --zone ZONE (e.g. us-central2-b for v4)"
[[ -n $config ]] || die "missing --config runs/<name> (an experiment folder of this project)"
[[ -n $out ]] || die "missing --out DIR (gs://BUCKET/PATH or a path shared by every worker)"
[[ $target =~ ^[A-Za-z0-9_.-]+$ ]] || die "--target '$target' is not a make target name"
[[ $tpu =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--tpu '$tpu' is not a valid TPU name (lowercase letters, digits and '-')"
config=${config%/}
[[ $config != /* && $config != *..* ]] ||
  die "--config '$config' must be a path inside the project, like runs/<name>"
[[ -e $REPO/$config ]] ||
  die "unknown config '$config': no such file or folder in $REPO; see ls runs/"
if ((!dry_run)); then
  command -v gcloud >/dev/null 2>&1 ||
    die "gcloud not found on PATH; install the Google Cloud CLI" \
      "(https://cloud.google.com/sdk/docs/install)"
fi
git -C "$REPO" rev-parse --verify -q HEAD >/dev/null ||
  die "$REPO has no commit; commit the project first (the TPU VM receives a git archive)"
[[ -n "$(git -C "$REPO" ls-files -- "$config")" ]] ||
  die "config '$config' is not tracked by git, so the TPU VM would not receive it; git add it"

gflags=(--zone "$zone")
[[ -z $project ]] || gflags+=(--project "$project")

show() { # print a command as one line that a shell reads back as the same words
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
  echo "+${line}"
}
run() { # print, then run unless --dry-run
  show "$@"
  ((dry_run)) || "$@"
}

# 1. Create or reuse the TPU VM.
describe=(gcloud compute tpus tpu-vm describe "$tpu" "${gflags[@]}"
  "--format=value(state,acceleratorType)")
create_cmd=(gcloud compute tpus tpu-vm create "$tpu" "${gflags[@]}"
  --accelerator-type "$accelerator" --version "$version")
if ((dry_run)); then
  show "${describe[@]}"
  if ((create)); then
    echo "# only if the describe above fails (no TPU VM named $tpu yet):"
    show "${create_cmd[@]}"
  fi
else
  show "${describe[@]}"
  if info="$("${describe[@]}" 2>/dev/null)"; then
    read -r state actual_type _ <<<"$info" || true
    [[ $state == READY ]] || die "TPU VM $tpu is in state '${state:-unknown}', not READY;" \
      "start it (gcloud compute tpus tpu-vm start $tpu --zone $zone) or delete it"
    if ((accelerator_given)) && [[ -n ${actual_type:-} && $actual_type != "$accelerator" ]]; then
      echo "$PROG: warning: reusing $tpu, a $actual_type, not the requested $accelerator" >&2
    fi
    echo "# reusing TPU VM $tpu ($state${actual_type:+, $actual_type})"
  elif ((create)); then
    run "${create_cmd[@]}"
  else
    die "no TPU VM named '$tpu' in zone $zone (or gcloud cannot see it); pass --create" \
      "to create a $accelerator, or check --tpu/--zone/--project"
  fi
fi

# 2. Pack the project (tracked files, with uncommitted edits) and copy it to every worker.
rev=$(git -C "$REPO" stash create 2>/dev/null || true) # a commit object; no ref, no file changes
rev=${rev:-HEAD}
tarball="${TMPDIR:-/tmp}/simfluence-src-$tpu-$$.tar.gz"
((dry_run)) || trap 'rm -f "$tarball"' EXIT
run git -C "$REPO" archive --format=tar.gz "--output=$tarball" "$rev"
run gcloud compute tpus tpu-vm scp "$tarball" "$tpu:$REMOTE_TARBALL" "${gflags[@]}" --worker=all

# 3. Unpack and install on every worker.
setup="mkdir -p $REMOTE_DIR && tar -xzf $REMOTE_TARBALL -C $REMOTE_DIR"
setup+=" && bash $REMOTE_DIR/scripts/tpu/worker.sh setup --libtpu-index $LIBTPU_INDEX"
run gcloud compute tpus tpu-vm ssh "$tpu" "${gflags[@]}" --worker=all --command "$setup"

# 4. The make target on every worker at once.
printf -v work 'bash %s/scripts/tpu/worker.sh run --target %q --config %q --out %q' \
  "$REMOTE_DIR" "$target" "$config" "$out"
for var in ${make_vars[@]+"${make_vars[@]}"}; do # (bash 3.2: empty arrays and set -u)
  printf -v work '%s --make-var %q' "$work" "$var"
done
if ((detach)); then
  log="simfluence-$target.log"
  printf -v work 'nohup bash -c %q > %s 2>&1 < /dev/null &' "$work" "$log"
fi
run gcloud compute tpus tpu-vm ssh "$tpu" "${gflags[@]}" --worker=all --command "$work"
if ((detach)); then
  echo "# started on every worker; follow it with:" \
    "gcloud compute tpus tpu-vm ssh $tpu ${gflags[*]} --worker=0 --command 'tail -f $log'"
elif ((!dry_run)); then
  echo "# done: make $target CONFIG=$config on every worker of $tpu; outputs in $out"
fi

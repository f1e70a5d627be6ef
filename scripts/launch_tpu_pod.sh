#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single host or pod): create or reuse the slice, put this checkout on
# every worker, and start the same `python -m ftjax train ... --distributed` on all of them.
#
# usage: scripts/launch_tpu_pod.sh NAME ZONE ACCELERATOR_TYPE VERSION CONFIG WORKDIR [`ftjax train` flags...]
#
#   NAME              TPU VM name, e.g. ftjax-v4-32 (reused if it exists, created otherwise)
#   ZONE              e.g. us-central2-b
#   ACCELERATOR_TYPE  e.g. v4-32, v5litepod-16
#   VERSION           TPU VM runtime, e.g. tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite (v5e)
#   CONFIG            experiment, as for `ftjax train`: experiments/alpaca_smollm2.py[:arg]
#   WORKDIR           shared by all hosts, so a bucket: gs://BUCKET/runs/NAME (checkpoints, metrics, TensorBoard)
#   further flags     passed on, e.g. --config.mesh.fsdp=8 --config.train.batch_size=256
#
# environment:
#   PROJECT=...       gcloud project (default: gcloud's configured one)
#   SPOT=1            create the slice as a Spot VM (preemptible; rerun this script to resume)
#   SOURCE=scp|git    scp (default): copy this checkout (the files git tracks or does not ignore);
#                     git: clone GIT_URL at GIT_REF (default main) on every worker
#   JAX_PIP='jax[tpu]'  the JAX install for the workers
#   DETACH=1          start training under nohup and return (log: ~/ftjax_train.log on each worker)
#
# jax.distributed.initialize() needs no arguments on a TPU slice: --distributed makes every worker
# find the others. Only worker 0 writes metrics; orbax writes the checkpoint from all of them.
# Rerunning the same command resumes from the latest checkpoint in WORKDIR.
set -euo pipefail

if [[ $# -lt 6 ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"  # the comment above
  exit 2
fi
NAME=$1 ZONE=$2 ACCELERATOR=$3 VERSION=$4 CONFIG=$5 WORKDIR=$6
shift 6
EXTRA=("$@")  # may be empty: expanded as ${EXTRA[@]+"${EXTRA[@]}"} for bash < 4.4 under set -u
SOURCE=${SOURCE:-scp}
JAX_PIP=${JAX_PIP:-jax[tpu]}
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then WHERE+=(--project="$PROJECT"); fi
REPO=$(cd "$(dirname "$0")/.." && pwd)

if [[ "$WORKDIR" != gs://* ]]; then
  echo "warning: WORKDIR=$WORKDIR is not a gs:// bucket; every worker would write its own local copy." >&2
fi

# 1. The slice: reuse it when it exists, create it otherwise.
if state=$("${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)' 2>/dev/null); then
  echo "Reusing TPU VM $NAME ($state)."
  if [[ "$state" != READY ]]; then
    echo "$NAME is $state, not READY; wait, or delete it: ${GCLOUD[*]} delete $NAME ${WHERE[*]}" >&2
    exit 1
  fi
else
  echo "Creating TPU VM $NAME ($ACCELERATOR, $VERSION) in $ZONE."
  create=(create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" --version="$VERSION")
  if [[ "${SPOT:-0}" == 1 ]]; then create+=(--spot); fi
  "${GCLOUD[@]}" "${create[@]}"
fi

on_all_workers() {  # runs a shell command on every worker, in parallel
  "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"
}

# 2. The code, on every worker.
if [[ "$SOURCE" == git ]]; then
  : "${GIT_URL:?SOURCE=git needs GIT_URL=https://.../ftjax.git}"
  ref=${GIT_REF:-main}
  on_all_workers "set -e; [ -d ftjax/.git ] || git clone -q $(printf '%q' "$GIT_URL") ftjax; \
    git -C ftjax fetch -q origin $(printf '%q' "$ref"); git -C ftjax checkout -q --force FETCH_HEAD"
else
  archive=$(mktemp -t ftjax-XXXXXX.tar.gz)
  trap 'rm -f "$archive"' EXIT
  git -C "$REPO" ls-files -z --cached --others --exclude-standard | tar -C "$REPO" -czf "$archive" --null -T -
  "${GCLOUD[@]}" scp "$archive" "$NAME":ftjax.tar.gz "${WHERE[@]}" --worker=all
  on_all_workers "set -e; rm -rf ftjax; mkdir ftjax; tar -xzf ftjax.tar.gz -C ftjax"
fi
on_all_workers "set -e; cd ftjax; python3 -m pip install -q -U $(printf '%q' "$JAX_PIP") \
  && python3 -m pip install -q -e . gcsfs google-cloud-storage"

# 3. The same command on every worker.
cmd=(python3 -m ftjax train "--config=$CONFIG" "--workdir=$WORKDIR" --distributed ${EXTRA[@]+"${EXTRA[@]}"})
quoted=$(printf '%q ' "${cmd[@]}")
if [[ "${DETACH:-0}" == 1 ]]; then
  on_all_workers "cd ftjax && nohup $quoted > ~/ftjax_train.log 2>&1 < /dev/null &"
  echo "Started. Follow worker 0:  ${GCLOUD[*]} ssh $NAME ${WHERE[*]} --worker=0 --command='tail -f ~/ftjax_train.log'"
else
  on_all_workers "set -o pipefail; cd ftjax && $quoted 2>&1 | tee ~/ftjax_train.log"
fi

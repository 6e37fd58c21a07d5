#!/usr/bin/env bash
# Runs `tradojax rl` on every worker of a Cloud TPU VM (one process per host, joined through
# jax.distributed: TRADOJAX_DISTRIBUTED=1) with --resume: after a preemption or a crash, run the
# same command again (after recreating and reinstalling a deleted VM) and training continues from
# the newest intact checkpoint in WORKDIR.
#
#   TPU_NAME=trado ZONE=us-east5-a CONFIG=configs/rl_trado_4b.py WORKDIR=gs://my-bucket/rl_trado_4b \
#     launch/tpu_vm_run.sh --config.hf_checkpoint=/path/on/workers/TraDo-4B-Instruct
#
# Required:
#   TPU_NAME, ZONE    the TPU VM
#   CONFIG            config file, relative to the checkout on the workers
# Optional:
#   WORKDIR           run directory; on a pod slice it must be shared by all workers (a gs:// bucket)
#                     (default: the config's experiment.workdir)
#   PROJECT           Google Cloud project
#   REMOTE_DIR        checkout directory in each worker's home (default: tradojax)
#   DETACH            1 (default): run in the background on the workers (log: ~/tradojax-rl.log,
#                     pid: ~/tradojax-rl.pid), so a dropped ssh connection does not stop training;
#                     0: stream the output here
#   STOP=1            instead of starting: send SIGTERM to the running job on every worker; it
#                     finishes the current step, saves a checkpoint and exits
#   GCLOUD            the gcloud executable (default: gcloud)
# Further arguments are passed to `tradojax rl` (e.g. --config.rl.steps=200).
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
  exit 2
}
required=(TPU_NAME ZONE)
if [[ "${STOP:-0}" != 1 ]]; then required+=(CONFIG); fi
for name in "${required[@]}"; do
  if [[ -z "${!name:-}" ]]; then
    echo "error: $name is not set" >&2
    usage
  fi
done
GCLOUD="${GCLOUD:-gcloud}"
REMOTE_DIR="${REMOTE_DIR:-tradojax}"
where=(--zone="$ZONE" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then where+=(--project="$PROJECT"); fi
cd_remote="cd ~/$(printf '%q' "$REMOTE_DIR")"

if [[ "${STOP:-0}" == 1 ]]; then
  command="$cd_remote; if [ -f ~/tradojax-rl.pid ]; then kill -TERM \$(cat ~/tradojax-rl.pid) && echo \"SIGTERM sent to \$(cat ~/tradojax-rl.pid)\"; else echo 'no ~/tradojax-rl.pid on this worker'; fi"
else
  rl=(.venv/bin/tradojax rl --config="$CONFIG")
  if [[ -n "${WORKDIR:-}" ]]; then rl+=(--workdir="$WORKDIR"); fi
  rl+=(--resume "$@")
  rl_q=$(printf '%q ' "${rl[@]}")
  if [[ "${DETACH:-1}" == 1 ]]; then
    # `cd || exit` then a plain background command: $! is the trainer itself (nohup execs it), so
    # STOP=1's SIGTERM reaches it
    command="$cd_remote || exit 1; TRADOJAX_DISTRIBUTED=1 nohup $rl_q > ~/tradojax-rl.log 2>&1 < /dev/null & echo \$! > ~/tradojax-rl.pid; echo \"started pid \$(cat ~/tradojax-rl.pid); log ~/tradojax-rl.log\""
  else
    command="$cd_remote && TRADOJAX_DISTRIBUTED=1 $rl_q"
  fi
fi

echo "+ on every worker of $TPU_NAME: $command" >&2
exec "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --command="$command"

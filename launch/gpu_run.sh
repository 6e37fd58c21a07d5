#!/usr/bin/env bash
# Runs `tradojax rl` on NVIDIA GPUs. One host: a single process sees every GPU (the mesh spans
# them). Several hosts: run this script on each with the same COORDINATOR and NUM_NODES and its
# own NODE_RANK (0 on the coordinator's host); the processes join through jax.distributed.
# --resume is always passed: rerunning after a crash continues from the newest intact checkpoint.
#
#   CONFIG=configs/rl_trado_4b.py launch/gpu_run.sh --config.hf_checkpoint=/models/TraDo-4B-Instruct
#   # two hosts:
#   NUM_NODES=2 NODE_RANK=0 COORDINATOR=10.0.0.1:12355 CONFIG=... WORKDIR=/shared/run launch/gpu_run.sh
#   NUM_NODES=2 NODE_RANK=1 COORDINATOR=10.0.0.1:12355 CONFIG=... WORKDIR=/shared/run launch/gpu_run.sh
#
# Required:
#   CONFIG            config file
# Optional:
#   WORKDIR           run directory (shared storage when NUM_NODES > 1; default: experiment.workdir)
#   NUM_NODES         hosts in the job (default 1)
#   NODE_RANK         this host's index, 0..NUM_NODES-1 (required when NUM_NODES > 1)
#   COORDINATOR       host:port of NODE_RANK 0, reachable from every host (required when NUM_NODES > 1)
#   CUDA_VISIBLE_DEVICES  restricts the GPUs this process uses (standard CUDA variable)
#   TRADOJAX          the tradojax executable (default: tradojax)
# Install first: pip install -e . 'jax[cuda12]==0.10.2'
# Further arguments are passed to `tradojax rl`.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
  exit 2
}
if [[ -z "${CONFIG:-}" ]]; then
  echo "error: CONFIG is not set" >&2
  usage
fi
NUM_NODES="${NUM_NODES:-1}"
if ! [[ "$NUM_NODES" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NUM_NODES=$NUM_NODES is not a positive integer" >&2
  usage
fi
if ((NUM_NODES > 1)); then
  for name in NODE_RANK COORDINATOR; do
    if [[ -z "${!name:-}" ]]; then
      echo "error: $name is not set (needed when NUM_NODES=$NUM_NODES > 1)" >&2
      usage
    fi
  done
  if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || ((NODE_RANK >= NUM_NODES)); then
    echo "error: NODE_RANK=$NODE_RANK must be in 0..$((NUM_NODES - 1))" >&2
    exit 2
  fi
  if [[ "$COORDINATOR" != *:* ]]; then
    echo "error: COORDINATOR=$COORDINATOR must be host:port" >&2
    exit 2
  fi
  # read by tradojax.parallel.distributed.initialize_from_environment
  export JAX_COORDINATOR_ADDRESS="$COORDINATOR" JAX_NUM_PROCESSES="$NUM_NODES" JAX_PROCESS_ID="$NODE_RANK"
fi
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"

rl=(rl --config="$CONFIG")
if [[ -n "${WORKDIR:-}" ]]; then rl+=(--workdir="$WORKDIR"); fi
rl+=(--resume "$@")
echo "+ ${TRADOJAX:-tradojax} ${rl[*]}" >&2
exec ${TRADOJAX:-tradojax} "${rl[@]}"

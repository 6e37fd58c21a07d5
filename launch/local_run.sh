#!/usr/bin/env bash
# Runs a tradojax command on this machine's CPU, optionally with several fake devices (to try a
# sharded mesh) and several local processes joined through jax.distributed (to try multi-host
# code on one machine).
#
#   launch/local_run.sh                                # tradojax demo
#   COMMAND=rl launch/local_run.sh --config=configs/demo.py --workdir=runs/local
#   FAKE_DEVICES=4 PROCESSES=2 COMMAND=rl launch/local_run.sh --config=configs/demo.py
#
# Optional:
#   COMMAND        tradojax subcommand (default: demo)
#   FAKE_DEVICES   CPU devices per process (default 1)
#   PROCESSES      local processes joined through jax.distributed on 127.0.0.1 (default 1); each
#                  gets JAX_PROCESS_ID, output prefixed with [process N]; one failing stops the rest
#   PORT           coordinator port when PROCESSES > 1 (default 12355)
#   TRADOJAX       the tradojax executable (default: tradojax)
# Further arguments are passed to the command.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
  exit 2
}
COMMAND="${COMMAND:-demo}"
FAKE_DEVICES="${FAKE_DEVICES:-1}"
PROCESSES="${PROCESSES:-1}"
PORT="${PORT:-12355}"
for name in FAKE_DEVICES PROCESSES PORT; do
  if ! [[ "${!name}" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: $name=${!name} is not a positive integer" >&2
    usage
  fi
done
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$FAKE_DEVICES"

if ((PROCESSES == 1)); then
  echo "+ ${TRADOJAX:-tradojax} $COMMAND $*" >&2
  exec ${TRADOJAX:-tradojax} "$COMMAND" "$@"
fi

export JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$PROCESSES"
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap stop_all INT TERM
for ((i = 0; i < PROCESSES; i++)); do
  # $! is the tradojax process itself (its output goes through sed), so stop_all reaches it
  JAX_PROCESS_ID=$i ${TRADOJAX:-tradojax} "$COMMAND" "$@" > >(sed -u "s/^/[process $i] /") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  if ! wait "$pid"; then
    status=1
    stop_all
  fi
done
exit "$status"

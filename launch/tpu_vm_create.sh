#!/usr/bin/env bash
# Creates a Cloud TPU VM: one host (e.g. v5litepod-8, v6e-8, v5p-8) or a pod slice (v5p-32, ...).
#
#   TPU_NAME=trado ZONE=us-east5-a ACCELERATOR_TYPE=v5p-8 launch/tpu_vm_create.sh
#
# Required:
#   TPU_NAME          name of the TPU VM
#   ZONE              a zone that offers the accelerator (e.g. us-east5-a for v5p, us-east1-d for v6e)
#   ACCELERATOR_TYPE  v5p-8 (4 chips), v5p-16, v5litepod-8 (8 chips), v6e-8, v6e-16, v4-8, ...
# Optional:
#   RUNTIME_VERSION   TPU software version (default from the type: v2-alpha-tpuv5, v2-alpha-tpuv5-lite,
#                     v2-alpha-tpuv6e, or tpu-ubuntu2204-base for v4 and older)
#   PROJECT           Google Cloud project (default: gcloud's configured project)
#   SPOT=1            a Spot VM (cheaper; preemptible: rerun tpu_vm_run.sh after recreating, it resumes)
#   GCLOUD            the gcloud executable (default: gcloud)
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
  exit 2
}
for name in TPU_NAME ZONE ACCELERATOR_TYPE; do
  if [[ -z "${!name:-}" ]]; then
    echo "error: $name is not set" >&2
    usage
  fi
done

if [[ -z "${RUNTIME_VERSION:-}" ]]; then
  case "$ACCELERATOR_TYPE" in
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v4-* | v3-* | v2-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    *)
      echo "error: no default RUNTIME_VERSION for ACCELERATOR_TYPE=$ACCELERATOR_TYPE; set RUNTIME_VERSION" >&2
      exit 2
      ;;
  esac
fi

args=(compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE"
  --version="$RUNTIME_VERSION")
if [[ -n "${PROJECT:-}" ]]; then args+=(--project="$PROJECT"); fi
if [[ "${SPOT:-0}" == 1 ]]; then args+=(--spot); fi

echo "+ ${GCLOUD:-gcloud} ${args[*]}" >&2
exec "${GCLOUD:-gcloud}" "${args[@]}"

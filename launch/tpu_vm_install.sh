#!/usr/bin/env bash
# Installs tradojax on every worker of a Cloud TPU VM (one host or a pod slice): copies this
# checkout (or clones REPO_URL), makes a Python 3.11 virtual environment with uv, and installs
# tradojax with jax[tpu]; then prints each worker's device count.
#
#   TPU_NAME=trado ZONE=us-east5-a launch/tpu_vm_install.sh
#
# Required:
#   TPU_NAME, ZONE    the TPU VM (as given to tpu_vm_create.sh)
# Optional:
#   PROJECT           Google Cloud project
#   REPO_URL          git URL to clone on the workers instead of copying this checkout
#   REMOTE_DIR        directory in each worker's home (default: tradojax)
#   PYTHON_VERSION    default 3.11 (the TPU images ship 3.10; uv fetches a managed Python)
#   JAX_SPEC          default jax[tpu]==0.10.2 (pins the matching libtpu)
#   GCLOUD            the gcloud executable (default: gcloud)
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
  exit 2
}
for name in TPU_NAME ZONE; do
  if [[ -z "${!name:-}" ]]; then
    echo "error: $name is not set" >&2
    usage
  fi
done
GCLOUD="${GCLOUD:-gcloud}"
REMOTE_DIR="${REMOTE_DIR:-tradojax}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]==0.10.2}"
where=(--zone="$ZONE" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then where+=(--project="$PROJECT"); fi

remote_dir_q=$(printf '%q' "$REMOTE_DIR")
if [[ -n "${REPO_URL:-}" ]]; then
  fetch="rm -rf ~/$remote_dir_q && git clone $(printf '%q' "$REPO_URL") ~/$remote_dir_q"
else
  repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  archive="$(mktemp -d)/tradojax-src.tar.gz"
  tar -czf "$archive" --exclude=.venv --exclude=.git --exclude=runs --exclude='__pycache__' -C "$repo_root" .
  echo "+ copying $repo_root to $TPU_NAME (all workers)" >&2
  "$GCLOUD" compute tpus tpu-vm scp "$archive" "$TPU_NAME":tradojax-src.tar.gz "${where[@]}"
  fetch="mkdir -p ~/$remote_dir_q && tar -xzf ~/tradojax-src.tar.gz -C ~/$remote_dir_q"
fi

install="set -euo pipefail; $fetch; cd ~/$remote_dir_q
python3 -m pip install --user --quiet uv
~/.local/bin/uv venv --python $(printf '%q' "$PYTHON_VERSION") .venv
~/.local/bin/uv pip install --python .venv/bin/python -e . $(printf '%q' "$JAX_SPEC")
.venv/bin/python -c 'import jax; print(\"worker\", jax.process_index(), \"sees\", jax.local_device_count(), \"of\", jax.device_count(), \"TPU devices\")'"

echo "+ installing on every worker of $TPU_NAME" >&2
exec "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --command="$install"

"""Multi-host start-up: one process per host joined by `jax.distributed` (no home-made RPC).

- Cloud TPU VM pod slices: call `initialize()` with no arguments on every worker; JAX reads the
  slice's topology from the TPU runtime (`launch/tpu_vm_run.sh` sets TRADOJAX_DISTRIBUTED=1).
- GPU or CPU clusters: every process gets the same coordinator address (host:port of process
  0) and the process count, and its own id: as arguments, or through the environment variables
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (`launch/gpu_run.sh`).
- CPU processes exchange collectives through gloo, which must be chosen before the backend starts.

Must run before anything touches a JAX device (creating an array, `jax.devices()`).
After it, `jax.devices()` lists every process's devices and a `Mesh` over them spans the hosts;
each process feeds its share of a global batch with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import dataclasses
import os

import jax

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_AUTO = "TRADOJAX_DISTRIBUTED"  # "1": initialize with the platform's auto-detection (TPU pods)


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands in the job."""

    process_index: int
    process_count: int
    local_device_count: int
    device_count: int

    @property
    def is_primary(self) -> bool:
        return self.process_index == 0


def process_info() -> ProcessInfo:
    return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: must be an integer") from None


def _platforms() -> list[str]:
    configured = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    return [p.strip().lower() for p in configured.split(",") if p.strip()]


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: list[int] | None = None,
               timeout_s: int = 300) -> ProcessInfo:
    """Joins this process to the job and returns its place in it.

    With no arguments and none of JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    set, JAX detects the cluster itself (Cloud TPU pods, SLURM, Open MPI); otherwise all three
    are needed (arguments win over the environment). A second call is a no-op. `timeout_s`
    bounds the wait for the other processes.
    """
    if jax.distributed.is_initialized():
        return process_info()
    address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
    count = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    index = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    given = {"coordinator_address": address, "num_processes": count, "process_id": index}
    if any(v is not None for v in given.values()):
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise ValueError(f"distributed: {', '.join(missing)} missing (set by argument or by "
                             f"{ENV_ADDRESS} / {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID}); all three are "
                             "needed outside an auto-detected cluster")
        if ":" not in address:
            raise ValueError(f"distributed: coordinator_address {address!r} must be host:port")
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"distributed: need 0 <= process_id < num_processes, got {index} and {count}")
    if _platforms() == ["cpu"]:
        # the CPU backend has no cross-process collectives unless told to use gloo
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index,
                                   local_device_ids=local_device_ids, initialization_timeout=timeout_s)
    except ValueError as err:
        if address is None:
            raise RuntimeError(
                f"distributed: no cluster detected ({err}); on GPU/CPU clusters pass coordinator_address, "
                f"num_processes and process_id, or set {ENV_ADDRESS}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}") from err
        raise
    return process_info()


def initialize_from_environment() -> ProcessInfo | None:
    """What command-line entry points call first: joins the job when the environment says there
    is one (TRADOJAX_DISTRIBUTED=1, or JAX_COORDINATOR_ADDRESS set), else does nothing (one process)."""
    auto = os.environ.get(ENV_AUTO, "").strip().lower()
    if auto not in ("", "0", "1", "true", "false"):
        raise ValueError(f"environment variable {ENV_AUTO}={auto!r}: must be 0 or 1")
    if auto in ("1", "true") or os.environ.get(ENV_ADDRESS):
        return initialize()
    return None

"""Placement on a mesh: parameters (logical axes through a role's rules), optimizer state, batches."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from tradojax.parallel.axes import PARAM_LOGICAL_AXES, VALUE_LOGICAL_AXES
from tradojax.parallel.mesh import batch_sharding, named_sharding


def logical_axes(path: str) -> tuple[str | None, ...]:
    """Logical axes of the policy or value-model parameter at dotted `path` (e.g. `layers.q_proj`)."""
    axes = PARAM_LOGICAL_AXES.get(path) or VALUE_LOGICAL_AXES.get(path)
    if axes is None:
        raise KeyError(f"no logical axes known for parameter {path!r}")
    return axes


def param_sharding(path: str, shape: tuple[int, ...], mesh: Mesh, role: str = "train") -> NamedSharding:
    return named_sharding(logical_axes(path), shape, mesh, role)


def state_shardings(params: nnx.State, mesh: Mesh, role: str = "train") -> nnx.State:
    """A tree like `params` (arrays or ShapeDtypeStructs) holding each leaf's NamedSharding."""
    def one(path, leaf):
        name = ".".join(str(p) for p in path)
        return param_sharding(name, leaf.shape, mesh, role)

    return nnx.map_state(one, params)


def shard_params(params: nnx.State, mesh: Mesh, role: str = "train") -> nnx.State:
    """Places every parameter onto its sharding (device_put; no host gather)."""
    shardings = state_shardings(params, mesh, role)
    return jax.device_put(params, shardings)


def place_state(tree: Any, mesh: Mesh | None, device: jax.Device | None = None) -> Any:
    """Optimizer state (and the like) beside its parameters: leaves already laid out on `mesh`
    keep their sharding, the rest (e.g. a step count) are replicated over it. Without a mesh every
    leaf is committed to `device` (default: the first device), as restored arrays are, so a resumed
    run reuses the same compiled update."""
    if mesh is None:
        return jax.device_put(tree, SingleDeviceSharding(device or jax.devices()[0]))
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        return jax.device_put(x, replicated)

    return jax.tree.map(place, tree)


def shard_batch(tree: Any, mesh: Mesh, role: str = "train") -> Any:
    """Host per-row arrays -> global arrays with axis 0 split over the role's data axes.

    Every process passes the same full arrays (the RL loop scores the whole rollout on each host);
    each one fills only the shards its own devices hold, so this works across hosts as well.
    """
    def one(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim, role) if x.ndim else NamedSharding(mesh, PartitionSpec())
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree)


def to_host(x: Any) -> np.ndarray:
    """A device array (or an nnx.Variable holding one) as a full numpy array on every process,
    gathered across hosts if needed: then every process must call it (a collective)."""
    if isinstance(x, nnx.Variable):
        x = x[...]
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

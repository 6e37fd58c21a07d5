"""The device mesh, and logical axes -> PartitionSpecs through a role's rules (`parallel/axes.py`).

A mesh axis is used at most once per array, and a dimension that the mesh axes do not divide
stays replicated (e.g. 8 KV heads on a tensor axis of 16).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tradojax.config import ConfigError, MeshConfig
from tradojax.parallel.axes import AXES, RULES

def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); -1 takes what is left."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [config.data, config.fsdp, config.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh: {len(devices)} devices are not divisible by the fixed axes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but {len(devices)} devices are available")
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.array(devices).reshape(sizes)
    return Mesh(grid, AXES)


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, role: str = "train") -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have the given logical names."""
    rules = RULES[role]
    used: set[str] = set()
    spec: list[Any] = []
    for name, size in zip(logical, shape):
        axes = tuple(a for a in (rules.get(name, ()) if name else ()) if a in mesh.shape and a not in used)
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def named_sharding(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, role: str = "train") -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh, role))


def batch_sharding(mesh: Mesh, ndim: int, role: str = "train") -> NamedSharding:
    """Shards axis 0 (the batch) over the role's data axes; the other axes are replicated.

    The batch must be divisible by the product of those axes (`data_parallel_size`).
    """
    axes = tuple(a for a in RULES[role]["batch"] if mesh.shape.get(a, 1) > 1)
    return NamedSharding(mesh, PartitionSpec(axes or None, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh, role: str = "train") -> int:
    return math.prod(mesh.shape.get(a, 1) for a in RULES[role]["batch"])

"""Parameter shardings: the model's logical axes through a role's rules onto a mesh."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from tradojax.models.transformer import PARAM_LOGICAL_AXES
from tradojax.parallel.mesh import named_sharding


def logical_axes(path: str) -> tuple[str | None, ...]:
    """Logical axes of the parameter at dotted `path` (e.g. `layers.q_proj`)."""
    try:
        return PARAM_LOGICAL_AXES[path]
    except KeyError:
        raise KeyError(f"no logical axes known for parameter {path!r}") from None


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

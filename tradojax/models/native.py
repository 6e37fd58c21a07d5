"""Native params checkpoints: an orbax directory holding the params and the ModelConfig (JSON).

`tradojax import-hf --out` writes one; every command that takes a model reads it (models/loading.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from tradojax.checkpoint import CheckpointError
from tradojax.config import ConfigError, ModelConfig, from_dict, to_dict
from tradojax.models.transformer import abstract_model
from tradojax.parallel.sharding import param_sharding

NATIVE_FORMAT = "tradojax-params"


def save_params_checkpoint(directory: str | os.PathLike, config: ModelConfig, params: nnx.State) -> Path:
    """Writes params + the ModelConfig (JSON) as an orbax checkpoint at `directory` (must not exist)."""
    directory = Path(directory).absolute()
    if directory.exists():
        raise CheckpointError(f"{directory}: already exists; choose a new checkpoint directory")
    meta = {"format": NATIVE_FORMAT, "version": 1, "model": to_dict(config)}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(directory, args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.to_pure_dict(params)), config=ocp.args.JsonSave(meta)))
    return directory


def load_params_checkpoint(directory: str | os.PathLike, mesh: Mesh | None = None,
                           role: str = "train") -> tuple[ModelConfig, nnx.State]:
    """Reads a checkpoint written by `save_params_checkpoint`; with a mesh, straight into the shardings."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not (directory / "config").is_dir() or not (directory / "params").is_dir():
        raise CheckpointError(f"{directory}: not a tradojax params checkpoint (no config/ and params/ items)")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        try:
            meta = checkpointer.restore(directory, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        except Exception as err:  # orbax raises many types for a damaged item
            raise CheckpointError(f"{directory / 'config'}: cannot read the model config: {err}") from None
        if not isinstance(meta, dict) or meta.get("format") != NATIVE_FORMAT:
            raise CheckpointError(f"{directory / 'config'}: not a {NATIVE_FORMAT} checkpoint")
        try:
            config = from_dict(ModelConfig, meta["model"], "model")
        except ConfigError as err:
            raise CheckpointError(f"{directory / 'config'}: {err}") from None
        abstract = nnx.split(abstract_model(config))[1]
        device = SingleDeviceSharding(jax.local_devices()[0])

        def target(path, leaf):
            name = ".".join(str(k) for k in path)
            sharding = param_sharding(name, leaf.shape, mesh, role) if mesh is not None else device
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

        targets = nnx.map_state(target, abstract)
        try:
            restored = checkpointer.restore(directory, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(nnx.to_pure_dict(targets)))).params
        except Exception as err:
            raise CheckpointError(f"{directory / 'params'}: cannot restore the parameters: {err}") from None
    nnx.replace_by_pure_dict(abstract, restored)
    return config, abstract



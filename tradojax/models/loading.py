"""Every command that takes a model reads it here, and every trained model is exported here.

A model source (`load_model`, and `hf_checkpoint` in a config) is any of:
  * a Hugging Face directory (config.json + safetensors: SDAR/TraDo, Qwen3, Qwen2, LLaDA, Dream);
  * a tradojax params checkpoint (written by `tradojax import-hf --out`: `config/` + `params/`);
  * a training run of `tradojax rl` or `tradojax sft`: the run directory (`--workdir`), its
    `checkpoints/` directory, or one step folder `checkpoints/<step>/`. The newest intact step is
    read unless a step is named; damaged steps are skipped with a message (checkpoint.py).
    The model config is the one the step saved (`meta["model"]`, else the run config's `model`).

`export_model` writes a policy (and a value model, when there is one) in Hugging Face form: the
one path behind `tradojax export-hf`, `tradojax rl --export-hf` and `tradojax sft --export-hf`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import jax
from flax import nnx
from jax.sharding import SingleDeviceSharding

from tradojax.checkpoint import CheckpointError, find_training_steps, read_training_step
from tradojax.config import Config, ConfigError, ModelConfig, from_dict
from tradojax.models.hf import load_hf_model, save_hf_model, save_hf_value_model
from tradojax.models.hf_config import CONFIG_FILE
from tradojax.models.native import load_params_checkpoint
from tradojax.models.transformer import Decoder, abstract_model, init_model
from tradojax.models.value import ValueModel
from tradojax.parallel.sharding import param_sharding

VALUE_DIR = "value"  # an export's value model: <export>/value/


@dataclasses.dataclass
class LoadedModel:
    policy: Decoder
    value: ValueModel | None  # a run's value model (when asked for and the run trained one)
    source: str  # what was read, for messages: e.g. "step 20 of runs/x (runs/x/checkpoints/20)"
    tokenizer: str | None = None  # the run config's `tokenizer` (None for other sources)


def run_model_config(meta: dict, folder: Path | str) -> ModelConfig:
    """The model config a training step was saved with: `meta["model"]` (the policy's own config),
    else the run config's `model` section (run directories written before steps stored it)."""
    record = meta.get("model")
    if record is None:
        record = (meta.get("config") or {}).get("model")
    if not isinstance(record, dict):
        raise CheckpointError(f"{folder}/meta: holds no model config (neither 'model' nor 'config.model')")
    try:
        return from_dict(ModelConfig, record, "model")
    except ConfigError as err:
        raise CheckpointError(f"{folder}/meta: {err}") from None


def _targets(abstract: nnx.State, mesh, role: str) -> Any:
    """ShapeDtypeStructs of `abstract` in their shardings (on `mesh` for `role`, else local device 0)."""
    device = SingleDeviceSharding(jax.local_devices()[0])

    def target(path, leaf):
        sharding = device if mesh is None else param_sharding(".".join(map(str, path)), leaf.shape, mesh, role)
        return leaf.replace(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding))

    return nnx.map_state(target, abstract)


def _abstract_value_model(config: ModelConfig) -> ValueModel:
    return nnx.eval_shape(lambda: ValueModel(config, rngs=nnx.Rngs(params=0)))


def _run_has_value_model(meta: dict) -> bool:
    return bool(((meta.get("config") or {}).get("rl") or {}).get("value_model"))


def load_run(path: str | os.PathLike, *, step: int | None = None, mesh=None, role: str = "train",
             with_value: bool = False, log: Callable[[str], None] = print) -> LoadedModel:
    """The policy (and with `with_value` the value model, if the run has one) of a training step."""
    configs: dict[str, ModelConfig] = {}

    def targets(meta: dict) -> dict[str, Any]:
        config = configs["model"] = run_model_config(meta, path)
        trees = {"policy": _targets(nnx.split(abstract_model(config))[1], mesh, role)}
        if with_value and _run_has_value_model(meta):
            trees["value"] = _targets(nnx.split(_abstract_value_model(config))[1], mesh, role)
        return trees

    folder, trees, meta = read_training_step(path, targets, step=step, log=log)
    config = configs["model"]
    policy = nnx.merge(nnx.split(abstract_model(config))[0], trees["policy"])
    value = None
    if "value" in trees:
        value = nnx.merge(nnx.split(_abstract_value_model(config))[0], trees["value"])
    tokenizer = (meta.get("config") or {}).get("tokenizer")
    return LoadedModel(policy, value, f"step {meta.get('step', folder.name)} of {path} ({folder})", tokenizer)


def model_source_kind(path: str | os.PathLike) -> str:
    """"hf", "params" or "run" for a readable model source; CheckpointError otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / CONFIG_FILE).is_file():
        return "hf"
    if (path / "config").is_dir() and (path / "params").is_dir():
        return "params"
    if find_training_steps(path) is not None:
        return "run"
    raise CheckpointError(
        f"{path}: not a model: expected a Hugging Face directory (config.json), a tradojax params checkpoint "
        "(config/ and params/, from import-hf), or a training run (its directory, checkpoints/ or a step folder)")


def load_model(path: str | os.PathLike, *, step: int | None = None, mesh=None, role: str = "train",
               with_value: bool = False, log: Callable[[str], None] = print) -> LoadedModel:
    """A model from any source (see the module docstring); `step` and `with_value` apply to runs."""
    kind = model_source_kind(path)
    if kind != "run" and step is not None:
        raise CheckpointError(f"{path}: a step ({step}) can only be chosen in a training run")
    if kind == "run":
        return load_run(path, step=step, mesh=mesh, role=role, with_value=with_value, log=log)
    if kind == "hf":
        model, _ = load_hf_model(path, mesh=mesh, role=role)
        return LoadedModel(model, None, str(path))
    config, params = load_params_checkpoint(path, mesh=mesh, role=role)
    return LoadedModel(nnx.merge(nnx.split(abstract_model(config))[0], params), None, str(path))


def load_policy(config: Config, mesh=None) -> Decoder:
    """The policy a config names: `hf_checkpoint` (any model source), else a random init of `config.model`."""
    if config.hf_checkpoint is None:
        return init_model(config.model, seed=config.experiment.seed)
    return load_model(config.hf_checkpoint, mesh=mesh).policy


def export_model(policy: Decoder, out_dir: str | os.PathLike, *, value: ValueModel | None = None,
                 tokenizer: Any = None, dtype: str | None = None, max_shard_bytes: int | None = None,
                 overwrite: bool = False) -> Path:
    """Writes `policy` in Hugging Face form at `out_dir` and, if given, `value` at `out_dir/value/`.

    The value model is written as the original saves its own (spec 3.7): the backbone as a
    checkpoint of the policy's family (its unused LM head included) plus `value_head.weight`
    [1, hidden] (a bias-free Linear(hidden, 1) over the final-normed hidden states).
    """
    sizes = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    out = save_hf_model(policy, out_dir, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite, **sizes)
    if value is not None:
        save_hf_value_model(value, out / VALUE_DIR, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite, **sizes)
    return out

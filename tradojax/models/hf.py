"""Hugging Face checkpoint directories in and out: config.json + safetensors + remote code + tokenizer.

Loading reads config.json (`hf_config`), checks every tensor that the family's key table
(`hf_keys`) names, then creates each parameter straight in its sharding: every device shard reads
only the bytes it holds (`jax.make_array_from_callback` over lazy safetensors slices), one tensor
at a time.

Export writes the safetensors files itself (`safetensors_io`), one tensor at a time, so a sharded
model is gathered to the host one parameter at a time (process 0 writes; every process joins the
gathers), then config.json, the family's remote code from `hf_code/` and the tokenizer.
Native (orbax) params checkpoints are in `models/native.py`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from tradojax.checkpoint import CheckpointError
from tradojax.config import ModelConfig
from tradojax.models.hf_config import CONFIG_FILE, model_config_to_hf, read_hf_config
from tradojax.models.hf_keys import HFCheckpointError, KeyRule, dim_sizes, key_table
from tradojax.models.safetensors_io import (DEFAULT_MAX_SHARD_BYTES, INDEX_FILE, ST_DTYPES, ST_NAMES, PlannedTensor,
                                            SafetensorsDirectory, SafetensorsWriter, plan_files)
from tradojax.models.transformer import DTYPES, Decoder, abstract_model, param_paths
from tradojax.models.value import ValueModel
from tradojax.parallel.sharding import param_sharding, to_host

log = logging.getLogger(__name__)

HF_CODE_DIR = Path(__file__).parent / "hf_code"
# The remote code copied next to each family's export (`trust_remote_code=True` loads it).
HF_CODE_FILES: dict[str, tuple[str, ...]] = {
    family: (f"configuration_{family}.py", f"modeling_{family}.py", "diffusion_attention.py")
    for family in ("sdar", "llada", "dream")
}

# Files copied from a tokenizer directory on export.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _check_tensors(files: SafetensorsDirectory, rules: list[KeyRule], config: ModelConfig) -> None:
    """Every expected tensor exists with the expected shape and a float dtype (before reading data)."""
    sizes = dim_sizes(config)
    for rule in rules:
        expected = rule.hf_shape(sizes)
        for layer in (range(config.num_layers) if rule.stacked else [None]):
            name = rule.name(layer)
            tensor = files.tensor_slice(name)
            shape, dtype = tuple(tensor.get_shape()), tensor.get_dtype()
            where = files.locate(name)
            if shape != expected:
                dims = " x ".join("*".join(group) for group in rule.hf_dims)
                raise HFCheckpointError(
                    f"{where}: tensor {name!r} has shape {list(shape)}, expected {list(expected)} "
                    f"([{dims}] from config.json)")
            if dtype not in ST_DTYPES:
                raise HFCheckpointError(f"{where}: tensor {name!r} has dtype {dtype}, expected a float type")
    expected_names = {rule.name(layer) for rule in rules
                      for layer in (range(config.num_layers) if rule.stacked else [None])}
    unused = sorted(files.names() - expected_names)
    if unused:
        log.warning("%s: %d tensors not used by the model, e.g. %s", files.directory, len(unused), unused[:3])


def _read_block(files: SafetensorsDirectory, rule: KeyRule, sizes: Mapping[str, int],
                layer: int | None, bounds: Mapping[str, tuple[int, int]], dtype: np.dtype) -> np.ndarray:
    """Our-layout block of one torch tensor, reading only the rows/columns that cover `bounds`."""
    block = files.tensor_slice(rule.name(layer))[rule.hf_slices(sizes, bounds)]
    return rule.to_ours(np.asarray(block), sizes, bounds).astype(dtype)


def _load_array(files: SafetensorsDirectory, rule: KeyRule, config: ModelConfig, shape: tuple[int, ...],
                dtype: np.dtype, sharding: jax.sharding.Sharding) -> jax.Array:
    sizes = dim_sizes(config)
    done: dict[tuple, np.ndarray] = {}  # replicated shards ask for the same block: read it once

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        spans = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        if spans not in done:
            if rule.stacked:
                bounds = dict(zip(rule.param_dims, spans[1:]))
                layers = range(*spans[0])
                done[spans] = np.stack([_read_block(files, rule, sizes, i, bounds, dtype) for i in layers])
            else:
                done[spans] = _read_block(files, rule, sizes, None, dict(zip(rule.param_dims, spans)), dtype)
        return done[spans]

    return jax.make_array_from_callback(shape, sharding, shard)


def load_hf_params(path: str | os.PathLike, config: ModelConfig, mesh: Mesh | None = None,
                   role: str = "train") -> nnx.State:
    """Reads the safetensors of checkpoint directory `path` into a params state for `config`.

    With a mesh, each parameter is created directly in its NamedSharding for `role`
    (parallel/sharding.py): every device shard reads only its part of the torch tensors. Without
    one, parameters land on the first local device. Values are cast to `config.param_dtype`.
    """
    path = Path(path)
    if not path.is_dir():
        raise HFCheckpointError(f"{path}: no such checkpoint directory")
    rules = key_table(config)
    abstract = nnx.split(abstract_model(config))[1]
    abstract_leaves = param_paths(abstract)
    dtype = np.dtype(DTYPES[config.param_dtype])
    arrays = {}
    with SafetensorsDirectory(path) as files:
        _check_tensors(files, rules, config)
        for rule in rules:
            shape = tuple(abstract_leaves[rule.param].shape)
            sharding = (param_sharding(rule.param, shape, mesh, role) if mesh is not None
                        else SingleDeviceSharding(jax.local_devices()[0]))
            arrays[rule.param] = _load_array(files, rule, config, shape, dtype, sharding)
    return nnx.map_state(lambda p, leaf: leaf.replace(arrays[".".join(str(k) for k in p)]), abstract)


def load_hf_model(path: str | os.PathLike, mesh: Mesh | None = None, role: str = "train",
                  dtype: str | None = None, overrides: Mapping[str, Any] | None = None) -> tuple[Decoder, ModelConfig]:
    """Loads a Hugging Face checkpoint directory (SDAR/TraDo, Qwen3, Qwen2, LLaDA, Dream).

    Args:
      path: directory with config.json and model.safetensors or sharded safetensors + index.
      mesh: place parameters in their shardings for `role` on this mesh (see load_hf_params).
      dtype: "float32" or "bfloat16" for parameters and compute; default: config.json's torch_dtype.
      overrides: ModelConfig fields to set (e.g. {"attention_impl": "reference", "mask_token_id": 3}).
    Returns (model, config).
    """
    fields = dict(overrides or {})
    if dtype is not None:
        dtype = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
        fields.setdefault("param_dtype", dtype)
        fields.setdefault("compute_dtype", dtype)
    config = read_hf_config(path, fields)
    params = load_hf_params(path, config, mesh, role)
    graphdef, _ = nnx.split(abstract_model(config))
    return nnx.merge(graphdef, params), config


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _config_and_params(model: Any) -> tuple[ModelConfig, Any]:
    if isinstance(model, Decoder):
        return model.config, nnx.state(model, nnx.Param)
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], ModelConfig):
        return model
    raise TypeError(f"expected a Decoder or a (ModelConfig, params) pair, got {type(model).__name__}")


@dataclasses.dataclass
class _Planned(PlannedTensor):
    rule: KeyRule | None = None  # None: an extra tensor, written as given (`value`)
    layer: int | None = None
    value: np.ndarray | None = None


def save_hf_model(model: Decoder | tuple[ModelConfig, Any], out_dir: str | os.PathLike, tokenizer: Any = None,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: str | None = None,
                  overwrite: bool = False, extra_tensors: Mapping[str, np.ndarray] | None = None) -> Path:
    """Writes a Hugging Face checkpoint directory in the family's form (SDAR, LLaDA or Dream).

    Writes `model.safetensors` or `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`
    (files up to `max_shard_bytes`), config.json, the family's remote code from `hf_code/`
    (`configuration_<family>.py`, `modeling_<family>.py`, `diffusion_attention.py`: so
    `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads it), and the
    tokenizer: an object with `save_pretrained` or a directory to copy files from. Parameters are
    gathered to the host one at a time; process 0 writes. `dtype` casts on the way
    ("bfloat16"/"float32"; default: the parameters' own). `extra_tensors` (name -> host array)
    are written after the parameters (e.g. a value head). Returns the directory.
    """
    config, params = _config_and_params(model)
    out = Path(out_dir)
    writer = jax.process_index() == 0
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: directory exists and is not empty (pass overwrite=True)")
    # Check the tokenizer before writing anything.
    copied_tokenizer_files = [] if tokenizer is None or hasattr(tokenizer, "save_pretrained") else tokenizer_files(tokenizer)
    leaves = param_paths(params)
    rules = key_table(config)
    sizes = dim_sizes(config)
    plan: list[_Planned] = []
    for rule in rules:
        if rule.param not in leaves:
            raise CheckpointError(f"parameter {rule.param!r} missing from the params to export")
        leaf_dtype = np.dtype(dtype) if dtype is not None else np.dtype(leaves[rule.param].dtype)
        if leaf_dtype not in ST_NAMES:
            raise CheckpointError(f"parameter {rule.param!r}: cannot export dtype {leaf_dtype}")
        for layer in (range(config.num_layers) if rule.stacked else [None]):
            plan.append(_Planned(rule.name(layer), rule.hf_shape(sizes), leaf_dtype, rule=rule, layer=layer))
    for name, array in (extra_tensors or {}).items():
        array = np.asarray(array)
        plan.append(_Planned(name, array.shape, np.dtype(dtype) if dtype is not None else array.dtype, value=array))
    dtype_names = {t.dtype.name for t in plan}
    hf_config = model_config_to_hf(config, "bfloat16" if "bfloat16" in dtype_names else "float32")
    # Greedy packing in plan order: files are then written strictly one after another.
    file_names = plan_files(plan, max_shard_bytes)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        for stale in list(out.glob("*.safetensors")) + [out / INDEX_FILE]:
            stale.unlink(missing_ok=True)
    with SafetensorsWriter(out, plan, file_names) as files:
        by_param: dict[str, list[_Planned]] = {}
        for t in plan:
            if t.rule is not None:
                by_param.setdefault(t.rule.param, []).append(t)
        for param, tensors in by_param.items():
            host = to_host(leaves[param])  # every process joins the gather
            if not writer:
                continue
            for t in tensors:
                files.write(t, t.rule.to_hf(host[t.layer] if t.layer is not None else host, sizes))
            del host
        if writer:
            for t in plan:
                if t.rule is None:
                    files.write(t, t.value)
            files.write_index()
    if writer:
        (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        for name in HF_CODE_FILES[config.family]:
            shutil.copyfile(HF_CODE_DIR / name, out / name)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(out))
        for file in copied_tokenizer_files:
            shutil.copyfile(file, out / file.name)
    return out


VALUE_HEAD = "value_head.weight"  # [1, hidden]: the original's bias-free Linear(hidden, 1)


def save_hf_value_model(value: Any, out_dir: str | os.PathLike, **kwargs) -> Path:
    """A ValueModel as the original saves its value model: the backbone in the family's form plus
    `value_head.weight` [1, hidden]. `kwargs` as for `save_hf_model`."""
    head = to_host(value.value_head)[None, :]
    return save_hf_model(value.backbone, out_dir, extra_tensors={VALUE_HEAD: head}, **kwargs)


def load_hf_value_model(path: str | os.PathLike, mesh: Mesh | None = None, role: str = "train") -> Any:
    """Reads a value model written by `save_hf_value_model` (or the original's) into a ValueModel."""
    backbone, config = load_hf_model(path, mesh=mesh, role=role)
    with SafetensorsDirectory(path) as files:
        tensor = files.tensor_slice(VALUE_HEAD)
        if tuple(tensor.get_shape()) != (1, config.hidden_size):
            raise HFCheckpointError(f"{files.locate(VALUE_HEAD)}: tensor {VALUE_HEAD!r} has shape "
                                    f"{list(tensor.get_shape())}, expected [1, {config.hidden_size}]")
        head = np.asarray(tensor[:])[0].astype(DTYPES[config.param_dtype])
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: ValueModel(config, rngs=nnx.Rngs(params=0))))
    if mesh is None:
        sharding = SingleDeviceSharding(jax.local_devices()[0])
    else:
        sharding = param_sharding("value_head", head.shape, mesh, role)
    state = nnx.State({"backbone": nnx.state(backbone), "value_head": nnx.Param(jax.device_put(head, sharding))})
    return nnx.merge(graphdef, state)


def tokenizer_files(directory: str | os.PathLike) -> list[Path]:
    """The tokenizer files of `directory` (tokenizer.json, vocab.json, tokenization_*.py, ...)."""
    source = Path(directory)
    if not source.is_dir():
        raise CheckpointError(f"{source}: tokenizer directory does not exist")
    files = sorted(p for p in source.iterdir() if p.is_file() and (
        p.name in TOKENIZER_FILES or p.name.startswith("tokenization_") or p.suffix == ".tiktoken"))
    if not any(p.name in ("tokenizer.json", "vocab.json", "tokenizer.model") or p.suffix == ".tiktoken"
               for p in files):
        raise CheckpointError(f"{source}: no tokenizer files (tokenizer.json, vocab.json, ...) found")
    return files

"""Hugging Face interop: config.json <-> ModelConfig, safetensors <-> params, native checkpoints.

Each family has one two-way key table (`SDAR_KEYS`, `DREAM_KEYS`, `LLADA_KEYS`): our parameter path
-> the Hugging Face tensor name (`{layer}` for stacked layer parameters). How a torch tensor maps
onto ours is described once per parameter in `PARAM_LAYOUTS` by *named dimensions*: torch keeps a
Linear weight as [out, in] with heads flattened (`q_proj` is [heads*head_dim, embed]) while we keep
`q_proj` as [embed, heads, head_dim]. From the names follow the reshape/transpose both ways and the
slice of the torch tensor that one device shard needs, so loading onto a mesh reads per shard only
the bytes that shard holds (`jax.make_array_from_callback`), one tensor at a time.

Export writes the safetensors files itself, one tensor at a time, so a sharded model is gathered
to the host one parameter at a time (process 0 writes; every process joins the gathers).

Native checkpoints (`save_params_checkpoint` / `load_params_checkpoint`) are orbax directories
holding the params and the ModelConfig as JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # also registers bfloat16 with numpy, which safetensors' numpy reader needs
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import SafetensorError, safe_open

from tradojax.checkpoint import CheckpointError
from tradojax.config import ConfigError, ModelConfig, from_dict, to_dict
from tradojax.models.transformer import DTYPES, Decoder, abstract_model, param_paths
from tradojax.parallel.sharding import to_host

log = logging.getLogger(__name__)

HF_CODE_DIR = Path(__file__).parent / "hf_code"
# The remote code copied next to each family's export (`trust_remote_code=True` loads it).
HF_CODE_FILES: dict[str, tuple[str, ...]] = {
    family: (f"configuration_{family}.py", f"modeling_{family}.py", "diffusion_attention.py")
    for family in ("sdar", "llada", "dream")
}
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # as `transformers` save_pretrained ("5GB")

# Files copied from a tokenizer directory on export.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


class HFCheckpointError(CheckpointError):
    """A Hugging Face checkpoint problem; the message names the file and, where known, the tensor."""


# ----------------------------------------------------------------------------------------------
# Key tables
# ----------------------------------------------------------------------------------------------

# our parameter -> Hugging Face tensor name, per family.
SDAR_KEYS: dict[str, str] = {
    "embed_tokens": "model.embed_tokens.weight",
    "layers.q_proj": "model.layers.{layer}.self_attn.q_proj.weight",
    "layers.k_proj": "model.layers.{layer}.self_attn.k_proj.weight",
    "layers.v_proj": "model.layers.{layer}.self_attn.v_proj.weight",
    "layers.o_proj": "model.layers.{layer}.self_attn.o_proj.weight",
    "layers.q_bias": "model.layers.{layer}.self_attn.q_proj.bias",
    "layers.k_bias": "model.layers.{layer}.self_attn.k_proj.bias",
    "layers.v_bias": "model.layers.{layer}.self_attn.v_proj.bias",
    "layers.q_norm": "model.layers.{layer}.self_attn.q_norm.weight",
    "layers.k_norm": "model.layers.{layer}.self_attn.k_norm.weight",
    "layers.input_layernorm": "model.layers.{layer}.input_layernorm.weight",
    "layers.post_attention_layernorm": "model.layers.{layer}.post_attention_layernorm.weight",
    "layers.gate_proj": "model.layers.{layer}.mlp.gate_proj.weight",
    "layers.up_proj": "model.layers.{layer}.mlp.up_proj.weight",
    "layers.down_proj": "model.layers.{layer}.mlp.down_proj.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}
# Dream (and Qwen2) use the Qwen names; the q/k/v biases are present, the q/k norms absent.
DREAM_KEYS: dict[str, str] = dict(SDAR_KEYS)
LLADA_KEYS: dict[str, str] = {
    "embed_tokens": "model.transformer.wte.weight",
    "layers.q_proj": "model.transformer.blocks.{layer}.q_proj.weight",
    "layers.k_proj": "model.transformer.blocks.{layer}.k_proj.weight",
    "layers.v_proj": "model.transformer.blocks.{layer}.v_proj.weight",
    "layers.o_proj": "model.transformer.blocks.{layer}.attn_out.weight",
    "layers.q_bias": "model.transformer.blocks.{layer}.q_proj.bias",
    "layers.k_bias": "model.transformer.blocks.{layer}.k_proj.bias",
    "layers.v_bias": "model.transformer.blocks.{layer}.v_proj.bias",
    "layers.input_layernorm": "model.transformer.blocks.{layer}.attn_norm.weight",
    "layers.post_attention_layernorm": "model.transformer.blocks.{layer}.ff_norm.weight",
    "layers.gate_proj": "model.transformer.blocks.{layer}.ff_proj.weight",
    "layers.up_proj": "model.transformer.blocks.{layer}.up_proj.weight",
    "layers.down_proj": "model.transformer.blocks.{layer}.ff_out.weight",
    "norm": "model.transformer.ln_f.weight",
    "lm_head": "model.transformer.ff_out.weight",
}
FAMILY_KEYS: dict[str, dict[str, str]] = {"sdar": SDAR_KEYS, "dream": DREAM_KEYS, "llada": LLADA_KEYS}

# our parameter -> (torch dims, each a group of named dims flattened into one; our dims without
# the stacked `layers` axis). E.g. q_proj: torch [heads*head_dim, embed] <-> ours [embed, heads, head_dim].
PARAM_LAYOUTS: dict[str, tuple[tuple[tuple[str, ...], ...], tuple[str, ...]]] = {
    "embed_tokens": ((("vocab",), ("embed",)), ("vocab", "embed")),
    "lm_head": ((("vocab",), ("embed",)), ("embed", "vocab")),
    "norm": ((("embed",),), ("embed",)),
    "layers.input_layernorm": ((("embed",),), ("embed",)),
    "layers.post_attention_layernorm": ((("embed",),), ("embed",)),
    "layers.q_proj": ((("heads", "head_dim"), ("embed",)), ("embed", "heads", "head_dim")),
    "layers.k_proj": ((("kv_heads", "head_dim"), ("embed",)), ("embed", "kv_heads", "head_dim")),
    "layers.v_proj": ((("kv_heads", "head_dim"), ("embed",)), ("embed", "kv_heads", "head_dim")),
    "layers.o_proj": ((("embed",), ("heads", "head_dim")), ("heads", "head_dim", "embed")),
    "layers.q_bias": ((("heads", "head_dim"),), ("heads", "head_dim")),
    "layers.k_bias": ((("kv_heads", "head_dim"),), ("kv_heads", "head_dim")),
    "layers.v_bias": ((("kv_heads", "head_dim"),), ("kv_heads", "head_dim")),
    "layers.q_norm": ((("head_dim",),), ("head_dim",)),
    "layers.k_norm": ((("head_dim",),), ("head_dim",)),
    "layers.gate_proj": ((("mlp",), ("embed",)), ("embed", "mlp")),
    "layers.up_proj": ((("mlp",), ("embed",)), ("embed", "mlp")),
    "layers.down_proj": ((("embed",), ("mlp",)), ("mlp", "embed")),
}


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """How one of our parameters maps onto Hugging Face tensors (one per layer if stacked)."""

    param: str  # our dotted path, e.g. "layers.q_proj"
    hf_name: str  # torch tensor name; "{layer}" is filled in for stacked parameters
    hf_dims: tuple[tuple[str, ...], ...]
    param_dims: tuple[str, ...]  # without the leading layers axis

    @property
    def stacked(self) -> bool:
        return "{layer}" in self.hf_name

    def name(self, layer: int | None) -> str:
        return self.hf_name.format(layer=layer) if self.stacked else self.hf_name

    def hf_shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(math.prod(sizes[d] for d in group) for group in self.hf_dims)

    def _expanded(self) -> list[str]:
        return [d for group in self.hf_dims for d in group]

    def to_ours(self, hf_block: np.ndarray, sizes: Mapping[str, int], bounds: Mapping[str, tuple[int, int]]) -> np.ndarray:
        """A torch-layout block (rows cut to whole outer dims, see `hf_slices`) -> our layout, cut to `bounds`."""
        shape, inner = [], []
        for group in self.hf_dims:
            start, stop = bounds[group[0]]
            shape += [stop - start] + [sizes[d] for d in group[1:]]
            inner += [slice(None)] + [slice(*bounds[d]) for d in group[1:]]
        expanded = hf_block.reshape(shape)[tuple(inner)]
        names = self._expanded()
        return expanded.transpose([names.index(d) for d in self.param_dims])

    def hf_slices(self, sizes: Mapping[str, int], bounds: Mapping[str, tuple[int, int]]) -> tuple[slice, ...]:
        """The torch-tensor slice covering `bounds`: whole inner dims of each flattened group."""
        slices = []
        for group in self.hf_dims:
            start, stop = bounds[group[0]]
            inner = math.prod(sizes[d] for d in group[1:])
            slices.append(slice(start * inner, stop * inner))
        return tuple(slices)

    def to_hf(self, ours: np.ndarray, sizes: Mapping[str, int]) -> np.ndarray:
        """One layer of our parameter -> the torch tensor."""
        names = self._expanded()
        expanded = ours.transpose([self.param_dims.index(d) for d in names])
        return np.ascontiguousarray(expanded.reshape(self.hf_shape(sizes)))


def dim_sizes(config: ModelConfig) -> dict[str, int]:
    return {
        "vocab": config.vocab_size, "embed": config.hidden_size, "heads": config.num_heads,
        "kv_heads": config.num_kv_heads, "head_dim": config.head_dim, "mlp": config.intermediate_size,
    }


def key_table(config: ModelConfig) -> list[KeyRule]:
    """The rules for every parameter this config's model has, in a stable order."""
    names = FAMILY_KEYS[config.family]
    params = param_paths(nnx.split(abstract_model(config))[1])
    rules = []
    for param in params:
        if param not in names or param not in PARAM_LAYOUTS:
            raise HFCheckpointError(f"family {config.family!r} has no Hugging Face name for parameter {param!r}")
        rules.append(KeyRule(param, names[param], *PARAM_LAYOUTS[param]))
    return rules


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ----------------------------------------------------------------------------------------------

# model_type (lower-cased) -> (family, qk_norm, qkv_bias); qwen3/qwen2 load as SDAR-like models.
MODEL_TYPES: dict[str, tuple[str, bool, bool]] = {
    "sdar": ("sdar", True, False),
    "qwen3": ("sdar", True, False),
    "qwen2": ("sdar", False, True),
    "dream": ("dream", False, True),
    "llada": ("llada", False, False),
}
# Mask token ids of the released checkpoints, used when config.json does not name one.
DEFAULT_MASK_TOKEN = {"sdar": 151669, "dream": 151666, "llada": 126336}
_DTYPE_NAMES = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float32", "float64": "float32"}


class _Fields:
    """Typed access to a config.json dict; errors name the file and the field."""

    def __init__(self, data: Mapping[str, Any], source: str):
        self.data, self.source = data, source

    def fail(self, field: str, message: str):
        raise HFCheckpointError(f"{self.source}: field {field!r}: {message}")

    def get(self, field: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        value = self.data.get(field)
        if value is None:
            if default is ...:
                self.fail(field, "missing")
            return default
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            self.fail(field, f"expected {getattr(kind, '__name__', kind)}, got {value!r}")
        return value

    def token_id(self, field: str) -> int | None:
        value = self.data.get(field)
        if isinstance(value, list):  # e.g. eos_token_id: [151645, 151643]
            value = value[0] if value else None
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            self.fail(field, f"expected a token id, got {value!r}")
        return value


def _rope_theta(f: _Fields, default: float) -> float:
    params = f.data.get("rope_parameters") or f.data.get("rope_scaling") or {}
    if not isinstance(params, dict):
        f.fail("rope_parameters", f"expected a dict, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
        f.fail("rope_parameters" if "rope_parameters" in f.data else "rope_scaling",
               f"RoPE scaling {rope_type!r} is not supported (only plain RoPE)")
    theta = params.get("rope_theta", f.data.get("rope_theta", default))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        f.fail("rope_theta", f"expected a number, got {theta!r}")
    return float(theta)


def _param_dtype(f: _Fields) -> str:
    name = f.data.get("torch_dtype") or f.data.get("dtype") or "float32"
    if name not in _DTYPE_NAMES:
        f.fail("torch_dtype", f"unsupported dtype {name!r} (known: {', '.join(_DTYPE_NAMES)})")
    return _DTYPE_NAMES[name]


def _qwen_fields(f: _Fields, family: str, model_type: str) -> dict[str, Any]:
    hidden = f.get("hidden_size", int)
    heads = f.get("num_attention_heads", int)
    head_dim = f.get("head_dim", int, None)
    if head_dim is None:
        if hidden % heads:
            f.fail("num_attention_heads", f"must divide hidden_size={hidden} when head_dim is absent")
        head_dim = hidden // heads
    if f.get("hidden_act", str, "silu") != "silu":
        f.fail("hidden_act", f"only 'silu' is supported, got {f.data['hidden_act']!r}")
    if model_type in ("sdar", "qwen3") and f.get("attention_bias", bool, False):
        f.fail("attention_bias", "q/k/v/o biases are not supported for Qwen3-style models")
    return {
        "vocab_size": f.get("vocab_size", int),
        "hidden_size": hidden,
        "intermediate_size": f.get("intermediate_size", int),
        "num_layers": f.get("num_hidden_layers", int),
        "num_heads": heads,
        "num_kv_heads": f.get("num_key_value_heads", int, heads),
        "head_dim": head_dim,
        "rope_theta": _rope_theta(f, 10000.0),
        "rms_norm_eps": f.get("rms_norm_eps", float, 1e-6),
        "max_position_embeddings": f.get("max_position_embeddings", int, 32768),
        "tie_word_embeddings": f.get("tie_word_embeddings", bool, False),
        "initializer_range": f.get("initializer_range", float, 0.02),
    }


def _llada_fields(f: _Fields) -> dict[str, Any]:
    requirements = {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms"}
    for field, wanted in requirements.items():
        if f.get(field, str, wanted) != wanted:
            f.fail(field, f"only {wanted!r} is supported, got {f.data[field]!r}")
    for field, wanted in {"rope": True, "alibi": False, "attention_layer_norm": False,
                          "include_bias": False, "bias_for_layer_norm": False, "input_emb_norm": False,
                          "scale_logits": False}.items():
        if f.get(field, bool, wanted) != wanted:
            f.fail(field, f"only {wanted} is supported")
    hidden = f.get("d_model", int)
    heads = f.get("n_heads", int)
    if hidden % heads:
        f.fail("n_heads", f"must divide d_model={hidden}")
    kv_heads = 1 if f.get("multi_query_attention", bool, False) else f.get("n_kv_heads", int, heads)
    mlp = f.get("mlp_hidden_size", int, None)
    if mlp is None:
        mlp = f.get("mlp_ratio", int, 4) * hidden
    return {
        # the embedding matrix has `embedding_size` rows (>= vocab_size, padded for speed)
        "vocab_size": f.get("embedding_size", int, None) or f.get("vocab_size", int),
        "hidden_size": hidden,
        "intermediate_size": mlp,
        "num_layers": f.get("n_layers", int),
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": hidden // heads,
        "rope_theta": _rope_theta(f, 10000.0),
        "rms_norm_eps": f.get("rms_norm_eps", float, 1e-5),
        "max_position_embeddings": f.get("max_sequence_length", int, 4096),
        "tie_word_embeddings": f.get("weight_tying", bool, False),
        "initializer_range": f.get("init_std", float, 0.02),
        "qkv_bias": f.get("include_qkv_bias", bool, False),
    }


def model_config_from_hf(hf: Mapping[str, Any], source: str = CONFIG_FILE,
                         overrides: Mapping[str, Any] | None = None) -> ModelConfig:
    """A Hugging Face config.json dict -> ModelConfig. `overrides` sets ModelConfig fields last.

    Raises HFCheckpointError naming `source` and the field for anything missing or unsupported.
    """
    f = _Fields(hf, source)
    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or model_type.lower() not in MODEL_TYPES:
        extra = " (mixture-of-experts models are not supported)" if "moe" in str(model_type).lower() else ""
        raise HFCheckpointError(
            f"{source}: unknown model_type {model_type!r}{extra}; supported: sdar, qwen3, qwen2, llada, Dream")
    family, qk_norm, qkv_bias = MODEL_TYPES[model_type.lower()]
    fields: dict[str, Any] = {"family": family, "qk_norm": qk_norm, "qkv_bias": qkv_bias}
    fields.update(_llada_fields(f) if family == "llada" else _qwen_fields(f, family, model_type.lower()))
    fields["block_size"] = f.get("block_size", int, ModelConfig.block_size)
    dtype = _param_dtype(f)
    fields["param_dtype"] = fields["compute_dtype"] = dtype
    eos, pad, bos = f.token_id("eos_token_id"), f.token_id("pad_token_id"), f.token_id("bos_token_id")
    eos = eos if eos is not None else (pad if pad is not None else bos)
    pad = pad if pad is not None else eos
    mask = f.token_id("mask_token_id")
    if mask is None and DEFAULT_MASK_TOKEN[family] < fields["vocab_size"]:
        mask = DEFAULT_MASK_TOKEN[family]
        log.info("%s: no mask_token_id; using %d, the released %s checkpoints' mask token", source, mask, family)
    for name, value in (("eos_token_id", eos), ("pad_token_id", pad), ("mask_token_id", mask)):
        if value is not None:
            fields[name] = value
    fields.update(overrides or {})
    for name in ("eos_token_id", "mask_token_id"):
        if name not in fields:
            raise HFCheckpointError(f"{source}: field {name!r} missing (give it with overrides={{{name!r}: ...}})")
    try:
        return from_dict(ModelConfig, fields, "model")
    except ConfigError as err:
        raise HFCheckpointError(f"{source}: {err}") from None


def read_hf_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> ModelConfig:
    """Reads `path/config.json` (or `path` itself if it is a file) into a ModelConfig."""
    path = Path(path)
    file = path if path.is_file() else path / CONFIG_FILE
    if not path.exists():
        raise HFCheckpointError(f"{path}: no such checkpoint directory")
    if not file.is_file():
        raise HFCheckpointError(f"{file}: no config.json in the checkpoint directory {path}")
    try:
        data = json.loads(file.read_text())
    except (ValueError, RecursionError) as err:  # bad syntax or UTF-8, nesting past the recursion limit
        raise HFCheckpointError(f"{file}: not valid JSON ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise HFCheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return model_config_from_hf(data, str(file), overrides)


def model_config_to_hf(config: ModelConfig, torch_dtype: str | None = None) -> dict[str, Any]:
    """ModelConfig -> config.json in the family's original form (SDAR's for sdar)."""
    c = config
    dtype = torch_dtype or c.param_dtype
    ids = {"bos_token_id": c.eos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
           "mask_token_id": c.mask_token_id}
    if c.family == "llada":
        if c.num_heads * c.head_dim != c.hidden_size:
            raise HFCheckpointError("LLaDA form needs num_heads * head_dim == hidden_size")
        return {
            "architectures": ["LLaDAModelLM"], "model_type": "llada",
            "d_model": c.hidden_size, "n_heads": c.num_heads, "n_kv_heads": c.num_kv_heads,
            "n_layers": c.num_layers, "mlp_hidden_size": c.intermediate_size, "mlp_ratio": 4,
            "vocab_size": c.vocab_size, "embedding_size": c.vocab_size,
            "max_sequence_length": c.max_position_embeddings, "rope": True, "rope_theta": c.rope_theta,
            "rope_full_precision": True, "rms_norm_eps": c.rms_norm_eps, "weight_tying": c.tie_word_embeddings,
            "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
            "layer_norm_with_affine": True, "bias_for_layer_norm": False, "include_bias": False,
            "include_qkv_bias": c.qkv_bias, "attention_layer_norm": False, "alibi": False,
            "multi_query_attention": None, "input_emb_norm": False, "scale_logits": False,
            "attention_dropout": 0.0, "residual_dropout": 0.0, "embedding_dropout": 0.0,
            "init_std": c.initializer_range, "use_cache": False, "torch_dtype": dtype, **ids,
            "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                         "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
        }
    qwen = {
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings, "initializer_range": c.initializer_range,
        "rms_norm_eps": c.rms_norm_eps, "use_cache": False, "tie_word_embeddings": c.tie_word_embeddings,
        "rope_theta": c.rope_theta, "rope_scaling": None, "attention_dropout": 0.0,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": c.num_layers,
        "torch_dtype": dtype, **ids,
    }
    if c.family == "dream":
        if not c.qkv_bias or c.qk_norm:
            raise HFCheckpointError("Dream form needs qkv_bias=True and qk_norm=False")
        return {"architectures": ["DreamModel"], "model_type": "Dream", **qwen,
                "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel",
                             "AutoModelForCausalLM": "modeling_dream.DreamModel"}}
    if c.qkv_bias or not c.qk_norm:
        raise HFCheckpointError(
            "SDAR form needs qk_norm=True and qkv_bias=False (a Qwen3 backbone); this model has "
            f"qk_norm={c.qk_norm}, qkv_bias={c.qkv_bias}")
    return {
        "architectures": ["SDARForCausalLM"], "model_type": "sdar",
        "auto_map": {
            "AutoConfig": "configuration_sdar.SDARConfig",
            "AutoModel": "modeling_sdar.SDARModel",
            "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
        },
        **qwen, "attention_bias": False, "block_size": c.block_size, "fuse_cross_entropy": False,
    }


# ----------------------------------------------------------------------------------------------
# Reading safetensors
# ----------------------------------------------------------------------------------------------

_ST_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16, "F64": np.float64}
_ST_NAMES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16"}


class SafetensorsDirectory:
    """The safetensors files of a checkpoint directory, opened lazily (memory-mapped by safetensors).

    With `model.safetensors.index.json` the index decides which file holds which tensor;
    otherwise every `*.safetensors` file in the directory is searched.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        index = self.directory / INDEX_FILE
        self.index_file = index if index.is_file() else None
        if self.index_file is not None:
            self._read_index()
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                others = [p.name for p in self.directory.glob("*.bin")] + [p.name for p in self.directory.glob("*.pt")]
                hint = f" (found {', '.join(others)}: convert them to safetensors first)" if others else ""
                raise HFCheckpointError(f"{self.directory}: no *.safetensors files{hint}")
            for file in files:
                for name in self._open(file).keys():
                    self._where.setdefault(name, file)
        self.files = sorted(set(self._where.values()) | set(self._handles))

    def _read_index(self) -> None:
        try:
            data = json.loads(self.index_file.read_text())
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise HFCheckpointError(f"{self.index_file}: not a valid safetensors index ({err})") from None
        for name, file_name in weight_map.items():
            file = self.directory / file_name
            if not file.is_file():
                raise HFCheckpointError(
                    f"{self.index_file}: tensor {name!r} is mapped to {file_name}, which does not exist in {self.directory}")
            self._where[name] = file

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="numpy"))
            except (SafetensorError, OSError, ValueError) as err:
                held = [n for n, f in self._where.items() if f == file][:3]
                holding = f" (it should hold {', '.join(held)}, ...)" if held else ""
                raise HFCheckpointError(
                    f"{file}: cannot read this safetensors file, it is truncated or corrupt{holding}: {err}") from None
        return self._handles[file]

    def names(self) -> set[str]:
        return set(self._where)

    def locate(self, name: str) -> Path:
        if name not in self._where:
            searched = self.index_file.name if self.index_file else ", ".join(f.name for f in self.files)
            raise HFCheckpointError(f"tensor {name!r} not found in {self.directory} (searched {searched})")
        return self._where[name]

    def tensor_slice(self, name: str):
        """safetensors' lazy slice of tensor `name` (`.get_shape()`, `.get_dtype()`, `[slices]`)."""
        file = self.locate(name)
        try:
            return self._open(file).get_slice(name)
        except SafetensorError as err:
            raise HFCheckpointError(f"{file}: tensor {name!r} cannot be read: {err}") from None

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> SafetensorsDirectory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
            if dtype not in _ST_DTYPES:
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
    from tradojax.parallel.sharding import param_sharding

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
# Writing safetensors
# ----------------------------------------------------------------------------------------------


def _config_and_params(model: Any) -> tuple[ModelConfig, Any]:
    if isinstance(model, Decoder):
        return model.config, nnx.state(model, nnx.Param)
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], ModelConfig):
        return model
    raise TypeError(f"expected a Decoder or a (ModelConfig, params) pair, got {type(model).__name__}")


@dataclasses.dataclass
class _Planned:
    name: str
    rule: KeyRule | None  # None: an extra tensor, written as given (`value`)
    layer: int | None
    shape: tuple[int, ...]
    dtype: np.dtype
    file: int = 0
    offset: int = 0
    value: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _write_header(handle, tensors: list[_Planned]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for t in tensors:
        header[t.name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [t.offset, t.offset + t.nbytes]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    handle.write(len(raw).to_bytes(8, "little"))
    handle.write(raw)


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
        if leaf_dtype not in _ST_NAMES:
            raise CheckpointError(f"parameter {rule.param!r}: cannot export dtype {leaf_dtype}")
        for layer in (range(config.num_layers) if rule.stacked else [None]):
            plan.append(_Planned(rule.name(layer), rule, layer, rule.hf_shape(sizes), leaf_dtype))
    for name, array in (extra_tensors or {}).items():
        array = np.asarray(array)
        plan.append(_Planned(name, None, None, array.shape, np.dtype(dtype) if dtype is not None else array.dtype,
                             value=array))
    dtype_names = {t.dtype.name for t in plan}
    hf_config = model_config_to_hf(config, "bfloat16" if "bfloat16" in dtype_names else "float32")
    # Greedy packing in plan order: files are then written strictly one after another.
    files: list[list[_Planned]] = [[]]
    used = 0
    for t in plan:
        if files[-1] and used + t.nbytes > max_shard_bytes:
            files.append([])
            used = 0
        t.file, t.offset = len(files) - 1, used
        files[-1].append(t)
        used += t.nbytes
    n = len(files)
    file_names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    if writer:
        out.mkdir(parents=True, exist_ok=True)
        for stale in list(out.glob("*.safetensors")) + [out / INDEX_FILE]:
            stale.unlink(missing_ok=True)
    handle = None
    current = -1

    def emit(t: _Planned, data: np.ndarray) -> None:  # tensors arrive in plan order
        nonlocal handle, current
        if t.file != current:
            if handle is not None:
                handle.close()
            current = t.file
            handle = open(out / file_names[current], "wb")
            _write_header(handle, files[current])
        handle.write(np.ascontiguousarray(data.astype(t.dtype)).tobytes())

    try:
        by_param: dict[str, list[_Planned]] = {}
        for t in plan:
            if t.rule is not None:
                by_param.setdefault(t.rule.param, []).append(t)
        for param, tensors in by_param.items():
            host = to_host(leaves[param])  # every process joins the gather
            if not writer:
                continue
            for t in tensors:
                emit(t, t.rule.to_hf(host[t.layer] if t.layer is not None else host, sizes))
            del host
        if writer:
            for t in plan:
                if t.rule is None:
                    emit(t, t.value)
    finally:
        if handle is not None:
            handle.close()
    if writer:
        if n > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in plan)},
                     "weight_map": {t.name: file_names[t.file] for t in plan}}
            (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
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
    from tradojax.models.value import ValueModel

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
        from tradojax.parallel.sharding import param_sharding

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


# ----------------------------------------------------------------------------------------------
# Native params checkpoints (orbax)
# ----------------------------------------------------------------------------------------------

NATIVE_FORMAT = "tradojax-params"


def save_params_checkpoint(directory: str | os.PathLike, config: ModelConfig, params: nnx.State) -> Path:
    """Writes params + the ModelConfig (JSON) as an orbax checkpoint at `directory` (must not exist)."""
    import orbax.checkpoint as ocp

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
    import orbax.checkpoint as ocp

    from tradojax.parallel.sharding import param_sharding

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



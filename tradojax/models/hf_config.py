"""A Hugging Face config.json <-> ModelConfig, in each family's original form (SDAR, LLaDA, Dream)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tradojax.config import ConfigError, ModelConfig, from_dict
from tradojax.models.hf_keys import HFCheckpointError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"

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

"""Hugging Face tensor names and layouts of our parameters: one two-way key table per family.

Each family has one key table (`SDAR_KEYS`, `DREAM_KEYS`, `LLADA_KEYS`): our parameter path -> the
Hugging Face tensor name (`{layer}` for stacked layer parameters). How a torch tensor maps onto ours
is described once per parameter in `PARAM_LAYOUTS` by *named dimensions*: torch keeps a Linear
weight as [out, in] with heads flattened (`q_proj` is [heads*head_dim, embed]) while we keep
`q_proj` as [embed, heads, head_dim]. From the names follow the reshape/transpose both ways and the
slice of the torch tensor that one device shard needs (`KeyRule.hf_slices`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
from flax import nnx

from tradojax.checkpoint import CheckpointError
from tradojax.config import ModelConfig
from tradojax.models.transformer import abstract_model, param_paths


class HFCheckpointError(CheckpointError):
    """A Hugging Face checkpoint problem; the message names the file and, where known, the tensor."""


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

"""Logical axis names, in one place (a leaf: it imports nothing of tradojax).

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters
and optimizer state sharded) and `tensor` (Megatron-style: heads and MLP columns). Every parameter
names the logical axes of its dimensions; a rule table per role maps each logical axis onto mesh
axes (`parallel/mesh.py` applies them). The rows of a batch are split over BATCH_AXES in every role
(the sampler, the trainer and the Pallas kernels' shard_map all follow it), heads over HEAD_AXES.
"""

from __future__ import annotations

AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes, per role. Training shards parameters over fsdp (ZeRO-3 style) and
# tensor; rollout keeps parameters whole across data/fsdp (they are read every step) and splits
# them over tensor only.
_TRAIN_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "layers": (),
    "head_dim": (),
    "norm": (),
    "length": (),
}
RULES: dict[str, dict[str, tuple[str, ...]]] = {
    "train": _TRAIN_RULES,
    "rollout": {**_TRAIN_RULES, "embed": ()},
}
BATCH_AXES = _TRAIN_RULES["batch"]  # the same in both roles
HEAD_AXES = _TRAIN_RULES["heads"]

# Logical axes of every policy parameter (`models/transformer.Decoder`, layers stacked on axis 0).
PARAM_LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
    "embed_tokens": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "norm": ("norm",),
    "layers.input_layernorm": ("layers", "norm"),
    "layers.post_attention_layernorm": ("layers", "norm"),
    "layers.q_proj": ("layers", "embed", "heads", "head_dim"),
    "layers.k_proj": ("layers", "embed", "kv_heads", "head_dim"),
    "layers.v_proj": ("layers", "embed", "kv_heads", "head_dim"),
    "layers.q_bias": ("layers", "heads", "head_dim"),
    "layers.k_bias": ("layers", "kv_heads", "head_dim"),
    "layers.v_bias": ("layers", "kv_heads", "head_dim"),
    "layers.o_proj": ("layers", "heads", "head_dim", "embed"),
    "layers.q_norm": ("layers", "head_dim"),
    "layers.k_norm": ("layers", "head_dim"),
    "layers.gate_proj": ("layers", "embed", "mlp"),
    "layers.up_proj": ("layers", "embed", "mlp"),
    "layers.down_proj": ("layers", "mlp", "embed"),
}

# The value model (`models/value.ValueModel`): the backbone is laid out like the policy; the
# [hidden] head like a norm scale (replicated).
VALUE_LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
    "value_head": ("norm",), **{f"backbone.{name}": axes for name, axes in PARAM_LOGICAL_AXES.items()}}

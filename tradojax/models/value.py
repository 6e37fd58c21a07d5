"""The diffusion value model (spec 3.7): the policy's backbone with a zero-initialised scalar head.

It reads the same `[prompt | clean | noisy]` rows as the policy and predicts, at each noisy
position j, the value of the state just before the denoising step that unmasks token j.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tradojax.config import ModelConfig
from tradojax.models.transformer import DTYPES, Decoder, rms_norm
from tradojax.ops.masks import MaskRule

# the parameters' logical axes: parallel/axes.VALUE_LOGICAL_AXES


class ValueModel(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.backbone = Decoder(config, rngs=rngs)
        self.value_head = nnx.Param(jnp.zeros((config.hidden_size,), DTYPES[config.param_dtype]))

    def __call__(self, tokens, positions, segments, rule: MaskRule = MaskRule.BLOCK_DIFFUSION) -> jax.Array:
        """[B, T] float32 values (the backbone's final-normed hidden state times the head)."""
        config = self.backbone.config
        hidden = self.backbone.hidden_states(tokens, positions, segments, rule)
        normed = rms_norm(hidden, self.backbone.norm[...], config.rms_norm_eps)
        return jnp.einsum("btd,d->bt", normed.astype(jnp.float32), self.value_head[...].astype(jnp.float32))


def value_model_from_policy(policy: Decoder) -> ValueModel:
    """A value model whose backbone is a copy of `policy`'s weights and whose head is zero."""
    value = nnx.eval_shape(lambda: ValueModel(policy.config, rngs=nnx.Rngs(params=0)))
    graphdef, _ = nnx.split(value)
    _, policy_state = nnx.split(policy)
    head = jnp.zeros((policy.config.hidden_size,), DTYPES[policy.config.param_dtype])
    state = nnx.State({"backbone": jax.tree.map(jnp.copy, policy_state), "value_head": nnx.Param(head)})
    return nnx.merge(graphdef, state)

"""The single-stream SFT loss of full-attention models (LLaDA, Dream; spec section 5).

loss = (1/B) Σ_rows w_r · mean_{j masked in row r} −log p(y_j): the per-row mean NLL over the masked
tokens (the original's LLaDA/Dream normalisation), with row weights for padding rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tradojax.ops.masks import MaskRule, full_segments
from tradojax.sft.rows import FullRows


def full_token_logprobs(model: nnx.Module, rows: FullRows) -> jax.Array:
    """[B, L1] float32: log p(target_j) at every response position under full attention.

    Dream's logits are shifted (the logit at position i predicts token i+1, spec 1.5), so response
    token j is read at column L0 + j − 1; LLaDA's at L0 + j. Only those L1 hidden states go through
    the LM head.
    """
    l1 = rows.targets.shape[1]
    l0 = rows.tokens.shape[1] - l1
    hidden = model.hidden_states(rows.tokens, rows.positions, full_segments(rows.valid), MaskRule.FULL)
    start = l0 - 1 if model.config.logits_shifted else l0
    logits = model.hidden_to_logits(hidden[:, start:start + l1])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(log_probs, rows.targets[..., None], axis=-1)[..., 0]


def full_sft_loss(model: nnx.Module, rows: FullRows, extra=None):
    """Per-row mean NLL over masked tokens, averaged over rows (weighted); metrics as `sft_loss`."""
    del extra
    logp = full_token_logprobs(model, rows)
    mask = rows.loss_mask.astype(jnp.float32)
    counts = mask.sum(axis=1)
    per_row = -(logp * mask).sum(axis=1) / jnp.maximum(counts, 1.0)
    loss = jnp.mean(per_row * rows.weights)
    tokens = mask.sum()
    return loss, {"loss": loss, "nll_per_token": -(logp * mask).sum() / jnp.maximum(tokens, 1), "tokens": tokens}

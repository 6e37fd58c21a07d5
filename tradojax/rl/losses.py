"""TraceRL losses (spec sections 3.5 and 3.7): PPO-clip surrogate, k1/k3 KL, clipped value loss.

All take per-token arrays [B, L1] over the noisy copy and a per-row normaliser [B]: the padded
response length L1 (the original) or the row's trained-token count.
"""

from __future__ import annotations

import jax.numpy as jnp


def kl_estimate(logp, ref_logp, estimator: str):
    """Per-token estimate of KL(π_θ ‖ π_ref) from samples of π_ref: k3 = e^{−d} − 1 + d, k1 = d."""
    d = logp - ref_logp
    if estimator == "k3":
        return jnp.exp(jnp.clip(-d, -10.0, 10.0)) - 1.0 + d
    if estimator == "k1":
        return d
    raise ValueError(f"kl estimator must be 'k1' or 'k3', got {estimator!r}")


def _row_mean(per_row, row_weights):
    """Mean over rows; `row_weights` scales rows (0 for padding rows), as in `Rows.weights`."""
    return jnp.mean(per_row if row_weights is None else per_row * row_weights)


def policy_loss(logp, old_logp, advantages, mask, normaliser, *, clip_eps: float, beta: float,
                kl_estimator: str = "k3", ref_logp=None, row_weights=None, kl_normaliser=None):
    """L = −mean_r (1/n_r) Σ_j min(ρA, clip(ρ, 1±ε)A) + β mean_r (1/k_r) Σ_j KL_j.

    `kl_normaliser` k_r defaults to `normaliser` n_r (SDAR); LLaDA/Dream sum the KL (k_r = 1, spec 3.10).

    `advantages` is [B] (one per response) or [B, L1] (per token, value-model variant). The KL is
    to the rollout policy (old_logp), as in the original, or to `ref_logp` when given.
    Returns (loss, metrics).
    """
    mask = mask.astype(jnp.float32)
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    log_ratio = jnp.clip(logp - old_logp, -10.0, 10.0)
    ratio = jnp.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    surrogate = jnp.minimum(unclipped, clipped)
    pg_loss = -_row_mean((surrogate * mask).sum(axis=1) / normaliser, row_weights)
    kl = kl_estimate(logp, old_logp if ref_logp is None else ref_logp, kl_estimator)
    kl_loss = _row_mean((kl * mask).sum(axis=1) / (normaliser if kl_normaliser is None else kl_normaliser),
                        row_weights)
    loss = pg_loss + beta * kl_loss
    tokens = jnp.maximum(mask.sum(), 1.0)
    metrics = {
        "pg_loss": pg_loss,
        "kl": (kl * mask).sum() / tokens,
        "clip_fraction": ((jnp.abs(ratio - 1.0) > clip_eps) * mask).sum() / tokens,
        "ratio_mean": (ratio * mask).sum() / tokens,
    }
    return loss, metrics


def value_loss(values, old_values, returns, mask, normaliser, *, clip_eps: float, row_weights=None):
    """½ max((V̂ − R)², (V_old + clip(V̂ − V_old, ±ε) − R)²), summed per row over the mask."""
    mask = mask.astype(jnp.float32)
    clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    per_token = 0.5 * jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    loss = _row_mean((per_token * mask).sum(axis=1) / normaliser, row_weights)
    return loss, {"value_loss": loss}

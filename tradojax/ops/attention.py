"""Attention: the einsum reference (any backend, the CPU default) and the dispatch to kernels.

Shapes: q [B, Tq, H, D]; k, v [B, Tk, Hkv, D] with H a multiple of Hkv (GQA). Scores and softmax are
computed in float32 whatever the input dtype; the output has q's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tradojax.ops.masks import MaskRule, Segments, dense_mask

_NEG = -1e30  # finite: a fully masked row gives a uniform softmax instead of NaN (never used)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | None = None) -> jax.Array:
    """Reference attention under an explicit boolean mask [B, Tq, Tk] (True = visible)."""
    batch, tq, heads, dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    scale = dim ** -0.5 if scale is None else scale
    qg = q.reshape(batch, tq, kv_heads, groups, dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, tq, heads, dim).astype(q.dtype)


def segment_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    rule: MaskRule,
    segments: Segments,
    *,
    impl: str = "reference",
) -> jax.Array:
    """Self-attention over one sequence layout under a mask rule (training, prefill, uncached)."""
    impl = resolve_impl(impl)
    if impl == "pallas":
        from tradojax.ops.pallas import dispatch

        return dispatch.segment_attention(q, k, v, rule, segments)
    mask = dense_mask(rule, segments, segments, self_attention=True)
    return masked_attention(q, k, v, mask)


def cached_block_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    cache_length: jax.Array,
    k_block: jax.Array,
    v_block: jax.Array,
    *,
    impl: str = "reference",
) -> jax.Array:
    """The decode step: the block's queries see cache slots [0, cache_length) and the whole block.

    q, k_block, v_block: [B, b, *, D]; k_cache, v_cache: [B, S, Hkv, D]; cache_length: [B] int32.
    """
    impl = resolve_impl(impl)
    if impl == "pallas":
        from tradojax.ops.pallas import dispatch

        return dispatch.cached_block_attention(q, k_cache, v_cache, cache_length, k_block, v_block)
    batch, block = q.shape[:2]
    slots = k_cache.shape[1]
    cache_visible = jnp.arange(slots)[None, :] < cache_length[:, None]
    key_visible = jnp.concatenate([cache_visible, jnp.ones((batch, block), bool)], axis=1)
    mask = jnp.broadcast_to(key_visible[:, None, :], (batch, block, slots + block))
    keys = jnp.concatenate([k_cache.astype(k_block.dtype), k_block], axis=1)
    values = jnp.concatenate([v_cache.astype(v_block.dtype), v_block], axis=1)
    return masked_attention(q, keys, values, mask)


def resolve_impl(impl: str) -> str:
    """`auto` takes the Pallas kernels on TPU/GPU and the reference elsewhere (CPU).

    On CPU, impl="pallas" runs the kernels in interpret mode (slow; for tests).
    """
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("tpu", "gpu") else "reference"
    if impl not in ("reference", "pallas"):
        raise ValueError(f"attention_impl must be 'auto', 'reference' or 'pallas', got {impl!r}")
    return impl

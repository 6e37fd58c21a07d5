"""Attention: the einsum reference (any backend, the CPU default) and the dispatch to kernels.

Shapes: q [B, Tq, H, D]; k, v [B, Tk, Hkv, D] with H a multiple of Hkv (GQA). Scores and softmax are
computed in float32 whatever the input dtype; the output has q's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tradojax.ops.masks import MaskRule, Segments, dense_mask
from tradojax.ops.pallas import dispatch

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
    layer: int | None = None,
) -> jax.Array:
    """The decode step: the block's queries see cache slots [0, cache_length) and the whole block.

    q: [B, Tq, H, D]; k_block, v_block: [B, b, Hkv, D] (every query sees all b of them; b may
    differ from Tq); k_cache, v_cache: [B, S, Hkv, D], or with `layer` (a static index) every
    layer's [layers, B, S, Hkv, D] of which this layer's is read; cache_length: [B] int32. The
    reference reads only the live cache prefix (`live_cache_attention`); the kernels read only each
    row's live tiles.
    """
    impl = resolve_impl(impl)
    if impl == "pallas":
        if layer is not None:
            k_cache, v_cache = k_cache[layer], v_cache[layer]
        return dispatch.cached_block_attention(q, k_cache, v_cache, cache_length, k_block, v_block)
    return live_cache_attention(q, k_cache, v_cache, cache_length, k_block, v_block, layer=layer)


def full_cache_attention(q, k_cache, v_cache, cache_length, k_block, v_block, layer: int | None = None) -> jax.Array:
    """`cached_block_attention` written out densely: every cache slot, masked (the tests' reference)."""
    if layer is not None:
        k_cache, v_cache = k_cache[layer], v_cache[layer]
    batch, queries = q.shape[:2]
    slots, block = k_cache.shape[1], k_block.shape[1]
    cache_visible = jnp.arange(slots)[None, :] < cache_length[:, None]
    key_visible = jnp.concatenate([cache_visible, jnp.ones((batch, block), bool)], axis=1)
    mask = jnp.broadcast_to(key_visible[:, None, :], (batch, queries, slots + block))
    keys = jnp.concatenate([k_cache.astype(k_block.dtype), k_block], axis=1)
    values = jnp.concatenate([v_cache.astype(v_block.dtype), v_block], axis=1)
    return masked_attention(q, keys, values, mask)


def live_prefixes(slots: int, min_chunk: int = 32, max_branches: int = 8) -> tuple[int, ...]:
    """The cache prefix lengths the reference decode attention may read: multiples of a chunk
    (at least `min_chunk` slots, at most `max_branches` of them), the last one the whole cache."""
    chunk = max(min_chunk, -(-slots // max_branches))
    return tuple(min(slots, chunk * i) for i in range(1, -(-slots // chunk) + 1))


def live_cache_attention(q, k_cache, v_cache, cache_length, k_block, v_block, layer: int | None = None) -> jax.Array:
    """The reference decode attention reading only the cache prefix that holds live slots.

    The shortest prefix of `live_prefixes(slots)` covering the batch's longest `cache_length` is
    chosen at run time (`lax.switch`, one static-shape branch per prefix), so a decode step early in
    a rollout reads a fraction of the cache. Scores against the cache and against the block are
    computed separately and share one softmax: the keys are never concatenated (no copy of the cache).
    With `layer`, the caches hold every layer and each branch slices this layer's live prefix
    itself: a layer's cache sliced before the `lax.switch` would be copied whole (XLA:CPU).
    """
    batch, queries, heads, dim = q.shape
    kv_heads = k_cache.shape[-2]
    slots = k_cache.shape[-3]
    qg = q.reshape(batch, queries, kv_heads, heads // kv_heads, dim)
    scale = dim ** -0.5

    def attend(prefix: int):
        def run(qg, k_cache, v_cache, cache_length, k_block, v_block):
            if layer is not None:
                k_cache, v_cache = k_cache[layer], v_cache[layer]
            keys, values = k_cache[:, :prefix].astype(k_block.dtype), v_cache[:, :prefix].astype(v_block.dtype)
            cache_scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, keys, preferred_element_type=jnp.float32) * scale
            visible = jnp.arange(prefix)[None, :] < cache_length[:, None]
            cache_scores = jnp.where(visible[:, None, None, None, :], cache_scores, _NEG)
            block_scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k_block, preferred_element_type=jnp.float32) * scale
            probs = jax.nn.softmax(jnp.concatenate([cache_scores, block_scores], axis=-1), axis=-1)
            out = (jnp.einsum("bhgqk,bkhd->bqhgd", probs[..., :prefix].astype(values.dtype), values,
                              preferred_element_type=jnp.float32)
                   + jnp.einsum("bhgqk,bkhd->bqhgd", probs[..., prefix:].astype(v_block.dtype), v_block,
                                preferred_element_type=jnp.float32))
            return out.reshape(batch, queries, heads, dim).astype(q.dtype)

        return run

    prefixes = live_prefixes(slots)
    operands = (qg, k_cache, v_cache, cache_length, k_block, v_block)
    if len(prefixes) == 1:
        return attend(prefixes[0])(*operands)
    branch = jnp.searchsorted(jnp.asarray(prefixes), jnp.max(cache_length), side="left")
    return jax.lax.switch(jnp.minimum(branch, len(prefixes) - 1), [attend(n) for n in prefixes], *operands)


def resolve_impl(impl: str) -> str:
    """`auto` takes the Pallas kernels on TPU/GPU and the reference elsewhere (CPU).

    On CPU, impl="pallas" runs the kernels in interpret mode (slow; for tests).
    """
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("tpu", "gpu") else "reference"
    if impl not in ("reference", "pallas"):
        raise ValueError(f"attention_impl must be 'auto', 'reference' or 'pallas', got {impl!r}")
    return impl

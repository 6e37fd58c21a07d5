"""The decoder: KV-cache calls against the full forward, dtype and remat switches, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import TINY_MODEL
from tradojax.config import MeshConfig
from tradojax.models.transformer import KVCache, apply, init_model, per_layer_view
from tradojax.ops import attention as attention_ops
from tradojax.ops.masks import MaskRule, inference_segments
from tradojax.parallel.mesh import batch_sharding, make_mesh
from tradojax.parallel.sharding import shard_params, state_shardings

CONFIG = dataclasses.replace(TINY_MODEL, vocab_size=128)


def block_causal_logits(model, tokens, block_size):
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    segments = inference_segments(positions, jnp.ones((batch, length), bool), block_size)
    return model(tokens, positions, segments)


def test_prefill_and_block_decode_match_full_forward():
    """Cache calls give the full block-causal forward's logits, per sequence, at ragged lengths."""
    model = init_model(CONFIG, seed=1)
    b = 4
    tokens = jax.random.randint(jax.random.key(0), (3, 16), 0, CONFIG.vocab_size)
    full = block_causal_logits(model, tokens, b)
    lengths = jnp.array([4, 8, 12])  # each sequence has committed a different number of blocks
    cache = model.prefill(tokens, lengths, KVCache.zeros(CONFIG, 3, 20), b)
    block = jnp.stack([jax.lax.dynamic_slice_in_dim(tokens[i], int(lengths[i]), b) for i in range(3)])
    logits, same_cache = model.decode_block(block, cache, commit=False)
    assert same_cache is cache
    for i in range(3):
        start = int(lengths[i])
        np.testing.assert_allclose(logits[i], full[i, start:start + b], atol=2e-5, rtol=0)
    # commit writes exactly the K/V a longer prefill would have written
    _, committed = model.decode_block(block, cache, commit=True)
    longer = model.prefill(tokens, lengths + b, KVCache.zeros(CONFIG, 3, 20), b)
    np.testing.assert_array_equal(committed.length, lengths + b)
    for i in range(3):
        end = int(lengths[i]) + b
        np.testing.assert_allclose(committed.k[:, i, :end], longer.k[:, i, :end], atol=2e-5)
        np.testing.assert_allclose(committed.v[:, i, :end], longer.v[:, i, :end], atol=2e-5)


def test_left_padded_sequence_decodes_as_alone():
    """Per-sequence block alignment: padding a sequence on the left changes nothing."""
    model = init_model(CONFIG, seed=2)
    tokens = jax.random.randint(jax.random.key(3), (1, 10), 0, CONFIG.vocab_size)
    alone = block_causal_logits(model, tokens, 4)
    padded = jnp.concatenate([jnp.zeros((1, 3), tokens.dtype), tokens], axis=1)
    valid = jnp.arange(13)[None] >= 3
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    logits = model(padded, positions, inference_segments(positions, valid, 4))
    np.testing.assert_allclose(logits[:, 3:], alone, atol=2e-5)


def test_bfloat16_compute_tracks_float32():
    model32 = init_model(CONFIG, seed=4)
    model16 = init_model(dataclasses.replace(CONFIG, compute_dtype="bfloat16"), seed=4)
    tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, CONFIG.vocab_size)
    ref = block_causal_logits(model32, tokens, 4)
    low = block_causal_logits(model16, tokens, 4)
    assert low.dtype == jnp.float32  # logits are always float32
    err = float(jnp.max(jnp.abs(low - ref)) / jnp.max(jnp.abs(ref)))
    assert 0 < err < 3e-2, err  # bf16 carries 8 mantissa bits


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_values_and_gradients(remat):
    tokens = jax.random.randint(jax.random.key(6), (2, 8), 0, CONFIG.vocab_size)

    def loss(config):
        graphdef, params = nnx.split(init_model(config, seed=7))

        def f(p):
            return jnp.mean(block_causal_logits(nnx.merge(graphdef, p), tokens, 4) ** 2)

        return jax.value_and_grad(f)(params)

    value, grads = loss(CONFIG)
    value_r, grads_r = loss(dataclasses.replace(CONFIG, remat=remat))
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_tied_head_and_qkv_bias_switches():
    config = dataclasses.replace(CONFIG, tie_word_embeddings=True, qkv_bias=True, qk_norm=False, family="dream")
    model = init_model(config)
    _, params = nnx.split(model)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    assert "lm_head" not in names and {"layers.q_bias", "layers.k_bias", "layers.v_bias"} <= names
    assert "layers.q_norm" not in names
    assert sum(x.size for x in jax.tree.leaves(params)) == config.num_params()
    assert config.logits_shifted
    hidden = jax.random.normal(jax.random.key(0), (1, 2, config.hidden_size))
    normed = hidden * jax.lax.rsqrt(jnp.mean(hidden * hidden, -1, keepdims=True) + config.rms_norm_eps)
    expected = jnp.einsum("btd,vd->btv", normed * model.norm[...], model.embed_tokens[...])  # tied head
    np.testing.assert_allclose(model.hidden_to_logits(hidden), expected, atol=1e-5)


def test_sharded_over_8_devices_matches_unsharded():
    assert len(jax.devices()) == 8
    model = init_model(CONFIG, seed=8)
    graphdef, params = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(9), (4, 12), 0, CONFIG.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(12), (4, 12))
    segments = inference_segments(positions, jnp.ones((4, 12), bool), 4)
    expected = apply(graphdef, params, tokens, positions, segments, MaskRule.BLOCK_DIFFUSION)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = shard_params(params, mesh)
    spec = state_shardings(params, mesh)["layers"]["q_proj"].spec
    assert tuple(spec) == (None, "fsdp", "tensor", None)
    assert sharded["layers"]["q_proj"][...].sharding.spec == spec
    place = batch_sharding(mesh, 2)
    got = apply(graphdef, sharded, jax.device_put(tokens, place), jax.device_put(positions, place),
                jax.device_put(segments, place), MaskRule.BLOCK_DIFFUSION)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_per_layer_view_gives_bit_identical_forwards_and_keeps_the_stored_layout():
    """The unrolled loop over per-layer weights (the CPU decode path) == the scan over stacked ones,
    bit for bit: prefill, decode with and without commit, the full forward."""
    model = init_model(dataclasses.replace(CONFIG, num_layers=3), seed=11)
    graphdef, stacked = nnx.split(model)
    per_layer = per_layer_view(stacked)
    assert isinstance(per_layer["layers"]["q_proj"].get_value(), tuple)
    assert len(per_layer["layers"]["q_proj"].get_value()) == 3
    assert len(per_layer_view(per_layer)["layers"]["q_proj"].get_value()) == 3  # idempotent
    assert stacked["layers"]["q_proj"][...].shape[0] == 3  # the stored (checkpoint) layout is untouched
    tokens = jax.random.randint(jax.random.key(12), (3, 16), 0, CONFIG.vocab_size)
    lengths = jnp.array([4, 8, 12])

    @jax.jit
    def run(params):
        m = nnx.merge(graphdef, params)
        cache = m.prefill(tokens, lengths, KVCache.zeros(m.config, 3, 24), 4)
        block = jax.vmap(lambda row, start: jax.lax.dynamic_slice_in_dim(row, start, 4))(tokens, lengths)
        peek, _ = m.decode_block(block, cache, commit=False)
        logits, cache = m.decode_block(block, cache, commit=True)
        return peek, logits, cache.k, cache.v, block_causal_logits(m, tokens, 4)

    for a, b in zip(run(stacked), run(per_layer)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def attention_f64(q, k_cache, v_cache, lengths, k_block, v_block):
    """Cached decode attention in float64 numpy, from its definition."""
    q, k_cache, v_cache, k_block, v_block = (np.asarray(x, np.float64) for x in (q, k_cache, v_cache, k_block, v_block))
    batch, block, heads, dim = q.shape
    group = heads // k_cache.shape[2]
    out = np.zeros(q.shape)
    for i in range(batch):
        keys = np.concatenate([k_cache[i, : lengths[i]], k_block[i]])
        values = np.concatenate([v_cache[i, : lengths[i]], v_block[i]])
        for h in range(heads):
            scores = q[i, :, h] @ keys[:, h // group].T / np.sqrt(dim)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            out[i, :, h] = (probs / probs.sum(-1, keepdims=True)) @ values[:, h // group]
    return out


@pytest.mark.parametrize("lengths", [[0, 5, 30], [33, 64, 10], [100, 99, 0], [0, 0, 0], [100, 100, 100]])
def test_live_slot_attention_reads_a_prefix_and_matches_float64(lengths):
    """The reference decode attention over the live cache prefix == float64 attention over exactly
    [0, length) + the block; stale cache slots (NaN here) are never read into the result."""
    keys = jax.random.split(jax.random.key(13), 5)
    batch, block, heads, kv_heads, dim, slots = 3, 4, 8, 2, 16, 100
    q = jax.random.normal(keys[0], (batch, block, heads, dim))
    k_cache = jax.random.normal(keys[1], (batch, slots, kv_heads, dim))
    v_cache = jax.random.normal(keys[2], (batch, slots, kv_heads, dim))
    k_block = jax.random.normal(keys[3], (batch, block, kv_heads, dim))
    v_block = jax.random.normal(keys[4], (batch, block, kv_heads, dim))
    lengths = jnp.array(lengths)
    prefixes = attention_ops.live_prefixes(slots)
    assert prefixes[-1] == slots and len(prefixes) > 1
    longest = int(lengths.max())
    read = min(p for p in prefixes if p >= longest)
    # slots past the chosen prefix hold NaN: the result is finite only if they are never read
    stale = (jnp.arange(slots) >= read)[None, :, None, None]
    k_cache, v_cache = jnp.where(stale, jnp.nan, k_cache), jnp.where(stale, jnp.nan, v_cache)
    got = attention_ops.cached_block_attention(q, k_cache, v_cache, lengths, k_block, v_block, impl="reference")
    want = attention_f64(q, k_cache, v_cache, np.asarray(lengths), k_block, v_block)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-6, rtol=0)

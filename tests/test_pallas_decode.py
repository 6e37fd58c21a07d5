"""The cached block-decode kernel (TPU and Triton variants, interpret mode) against the reference.

Error metric: max |kernel - reference| / max |reference|, the reference computed in float32 at
"highest" matmul precision from the same (possibly bfloat16-rounded) inputs. Bounds: 2e-6 for
float32 inputs, 1.5e-2 for bfloat16 inputs (the kernel multiplies in bfloat16, accumulates in f32).

Interpret mode fills outputs and scratch with NaN before the kernel runs (checked below), so a
tile the kernel forgets to write, or a read of an uninitialised accumulator, shows up as NaN. The
cache slots past each sequence's length hold NaN too: they must never reach the result.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import pallas as pl

from helpers import TINY_MODEL
from tradojax.models import transformer
from tradojax.ops import attention
from tradojax.ops.pallas import decode, dispatch

REL_BOUND = {jnp.float32: 2e-6, jnp.bfloat16: 1.5e-2}


def relative_error(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


def decode_inputs(seed, batch, block, heads, kv_heads, dim, slots, lengths, dtype):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)  # noqa: E731
    k_cache, v_cache = normal(batch, slots, kv_heads, dim), normal(batch, slots, kv_heads, dim)
    lengths = jnp.asarray(lengths, jnp.int32)
    stale = jnp.arange(slots)[None, :, None, None] >= lengths[:, None, None, None]
    k_cache = jnp.where(stale, jnp.nan, k_cache).astype(dtype)  # never to be read into the result
    v_cache = jnp.where(stale, jnp.nan, v_cache).astype(dtype)
    return (normal(batch, block, heads, dim), k_cache, v_cache, lengths,
            normal(batch, block, kv_heads, dim), normal(batch, block, kv_heads, dim))


def reference(q, k_cache, v_cache, lengths, k_block, v_block):
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    # the reference multiplies every slot (its mask is applied to the scores): zero the NaN slots
    stale = jnp.arange(k_cache.shape[1])[None, :, None, None] >= lengths[:, None, None, None]
    k_cache, v_cache = jnp.where(stale, 0, f32(k_cache)), jnp.where(stale, 0, f32(v_cache))
    return attention.cached_block_attention(f32(q), k_cache, v_cache, lengths, f32(k_block), f32(v_block))


# (head_dim, query groups, block size, dtype): every head_dim, GQA ratio, block size and dtype
CASES = [
    (64, 1, 4, jnp.float32),
    (128, 4, 8, jnp.float32),
    (64, 8, 16, jnp.bfloat16),
    (128, 1, 32, jnp.bfloat16),
    (128, 8, 4, jnp.bfloat16),
    (64, 4, 32, jnp.float32),
]


@pytest.mark.parametrize("backend", ["tpu", "triton"])
@pytest.mark.parametrize("dim,groups,block,dtype", CASES)
def test_decode_kernel_matches_reference(backend, dim, groups, block, dtype):
    kv_heads, slots = 2, 64
    # ragged: empty cache, a partial tile, a tile boundary, a full cache
    lengths = [0, 21, 32, 64]
    inputs = decode_inputs(dim + groups + block, len(lengths), block, groups * kv_heads, kv_heads, dim, slots,
                           lengths, dtype)
    run = jax.jit(lambda *a: decode.decode_attention(*a, backend=backend, interpret=True, block_k=16))
    out = run(*inputs)
    assert out.shape == inputs[0].shape and out.dtype == dtype
    assert bool(jnp.isfinite(out.astype(jnp.float32)).all()), "unwritten rows or stale slots leaked in"
    assert relative_error(out, reference(*inputs)) < REL_BOUND[dtype]


@pytest.mark.parametrize("backend", ["tpu", "triton"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_kernel_with_more_block_keys_than_queries(backend, dtype):
    """The fused save's second half: b queries see the cache and 2b block keys (decided + own)."""
    block, kv_heads, groups, dim, slots, lengths = 4, 2, 4, 64, 48, [0, 13, 32, 48]
    q, k_cache, v_cache, lengths, _, _ = decode_inputs(21, len(lengths), block, groups * kv_heads, kv_heads, dim,
                                                       slots, lengths, dtype)
    rng = np.random.default_rng(22)
    k_block, v_block = (jnp.asarray(rng.standard_normal((len(lengths), 2 * block, kv_heads, dim)), jnp.float32)
                        .astype(dtype) for _ in range(2))
    run = jax.jit(lambda *a: decode.decode_attention(*a, backend=backend, interpret=True, block_k=16))
    out = run(q, k_cache, v_cache, lengths, k_block, v_block)
    assert out.shape == q.shape and bool(jnp.isfinite(out.astype(jnp.float32)).all())
    assert relative_error(out, reference(q, k_cache, v_cache, lengths, k_block, v_block)) < REL_BOUND[dtype]


@pytest.mark.parametrize("backend", ["tpu", "triton"])
def test_decode_with_a_tile_that_does_not_divide_the_cache(backend):
    """70 slots in tiles of 16: the last tile reads 10 slots past the cache (interpret mode pads
    them with NaN); lengths up to the full cache."""
    inputs = decode_inputs(11, 3, 4, 8, 2, 64, 70, [70, 66, 3], jnp.float32)
    out = jax.jit(lambda *a: decode.decode_attention(*a, backend=backend, interpret=True, block_k=16))(*inputs)
    assert bool(jnp.isfinite(out).all())
    assert relative_error(out, reference(*inputs)) < REL_BOUND[jnp.float32]


def test_decode_skips_tiles_past_each_length():
    """The TPU index_map clamps to the last valid tile; the result must not depend on the tiles
    past the length, whatever they hold (NaN above; huge values here)."""
    inputs = list(decode_inputs(7, 2, 4, 4, 2, 64, 64, [5, 40], jnp.float32))
    poisoned = [x.at[:, 48:].set(1e30) if i in (1, 2) else x for i, x in enumerate(inputs)]
    run = jax.jit(lambda *a: decode.decode_attention(*a, backend="tpu", interpret=True, block_k=16))
    np.testing.assert_array_equal(np.asarray(run(*inputs)), np.asarray(run(*poisoned)))


def test_interpret_mode_poisons_unwritten_outputs():
    """Guards the tests above: an output block the kernel never writes comes back NaN."""
    def half_writer(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    out = pl.pallas_call(half_writer, grid=(2,), in_specs=[pl.BlockSpec((8, 16), lambda i: (i, 0))],
                         out_specs=pl.BlockSpec((8, 16), lambda i: (i, 0)),
                         out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32), interpret=True)(jnp.ones((16, 16)))
    assert bool(jnp.isfinite(out[:8]).all()) and bool(jnp.isnan(out[8:]).all())


def test_dispatch_on_cpu_interprets_the_tpu_kernel_and_rejects_bad_shapes():
    assert dispatch.kernel_backend("cpu") == ("tpu", True)
    assert dispatch.kernel_backend("tpu") == ("tpu", False)
    assert dispatch.kernel_backend("gpu") == ("triton", False)
    q, k_cache, v_cache, lengths, k_block, v_block = decode_inputs(3, 2, 4, 4, 2, 16, 32, [3, 9], jnp.float32)
    with pytest.raises(ValueError, match="lengths shape"):
        decode.decode_attention(q, k_cache, v_cache, lengths[:1], k_block, v_block, interpret=True)
    with pytest.raises(ValueError, match="k_block"):
        decode.decode_attention(q, k_cache, v_cache, lengths, k_block[:, :2], v_block, interpret=True)
    with pytest.raises(ValueError, match="k_block"):
        decode.decode_attention(q, k_cache, v_cache, lengths, k_block[..., :8], v_block[..., :8], interpret=True)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        decode.decode_attention(q[:, :, :3], k_cache, v_cache, lengths, k_block, v_block, interpret=True)
    with pytest.raises(ValueError, match="backend"):
        decode.decode_attention(q, k_cache, v_cache, lengths, k_block, v_block, backend="cuda")
    assert decode.default_block_k(1030, "tpu") == 512 and decode.default_block_k(40, "tpu") == 40


def test_model_cached_decode_with_pallas_equals_reference():
    """Prefill, decode_block (commit and not) and the fused save of the tiny model: impl="pallas" == "reference"."""
    config = dataclasses.replace(TINY_MODEL, attention_impl="reference")
    graphdef, params = nnx.split(transformer.init_model(config, seed=0))
    pallas_graphdef, _ = nnx.split(transformer.init_model(dataclasses.replace(config, attention_impl="pallas"), seed=0))
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(1, config.vocab_size, (3, 12)))
    lengths = jnp.array([5, 12, 8], jnp.int32)
    blocks = jnp.asarray(rng.integers(1, config.vocab_size, (2, 3, 4)))

    def rollout(graphdef, params):
        model = nnx.merge(graphdef, params)
        cache = model.prefill(prompt, lengths, transformer.KVCache.zeros(config, 3, 32), block_size=4)
        first, cache = model.decode_block(blocks[0], cache, commit=True)
        second, _ = model.decode_block(blocks[1], cache, commit=False)
        # the fused save: rows 0 and 2 save blocks[1] and denoise blocks[0]; row 1 saves nothing
        fused, fused_cache = model.decode_block_after_save(blocks[1], jnp.array([True, False, True]), blocks[0], cache)
        return first, second, cache.k, fused, fused_cache.k, fused_cache.length

    ours = jax.jit(rollout, static_argnums=0)(pallas_graphdef, params)
    ref = jax.jit(rollout, static_argnums=0)(graphdef, params)
    np.testing.assert_array_equal(np.asarray(ours[-1]), np.asarray(ref[-1]))
    for a, b in zip(ours[:-1], ref[:-1]):
        assert relative_error(a, b) < 1e-5

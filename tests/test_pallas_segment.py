"""The segment (training / prefill) flash kernel, TPU and Triton variants in interpret mode, against
the dense reference: forward, gradients, tile tables, sharding, and the model end to end.

Error metric: max |kernel - reference| / max |reference|, the reference computed in float32 at
"highest" matmul precision from the same (possibly bfloat16-rounded) inputs. Bounds: forward
2e-6 (float32) and 1.5e-2 (bfloat16); gradients 2e-5 (float32) and 3e-2 (bfloat16).
Interpret mode fills outputs with NaN first (see test_pallas_decode), so unwritten tiles fail the
finiteness checks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from helpers import TINY_MODEL
from tradojax.models import transformer
from tradojax.ops import attention, masks
from tradojax.ops.masks import BlockAlignment, MaskRule, Segments
from tradojax.ops.pallas import dispatch, segment

FWD_BOUND = {jnp.float32: 2e-6, jnp.bfloat16: 1.5e-2}
GRAD_BOUND = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def relative_error(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


def training_layout(seed, batch, prompt_len, response_len, block, alignment=BlockAlignment.INFERENCE):
    """`[prompt | clean | noisy]` with ragged left pads (row 0 unpadded, row 1 all but one token)."""
    rng = np.random.default_rng(seed)
    pads = [0, prompt_len - 1] + list(rng.integers(0, prompt_len, batch - 2))
    prompt_valid = np.arange(prompt_len)[None, :] >= np.asarray(pads)[:, None]
    block_ids, kind, valid, _ = masks.training_segments(prompt_valid, response_len, block, alignment)
    return Segments(jnp.asarray(block_ids), jnp.asarray(kind), jnp.asarray(valid))


def prefill_layout(seed, batch, length, block):
    """Block-causal prefill of left-padded prompts of ragged lengths (one fully padded row)."""
    rng = np.random.default_rng(seed)
    prompt_lengths = np.concatenate([[length, 0], rng.integers(1, length, batch - 2)])
    valid = np.arange(length)[None, :] >= (length - prompt_lengths)[:, None]
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    return masks.inference_segments(jnp.asarray(positions), jnp.asarray(valid), block)


def full_layout(seed, batch, length):
    """Left-padded rows (LLaDA/Dream prompts); row 1 has no valid key: every query sees itself."""
    rng = np.random.default_rng(seed)
    pads = np.concatenate([[0, length], rng.integers(1, length, batch - 2)])
    valid = np.arange(length)[None, :] >= pads[:, None]
    return masks.full_segments(jnp.asarray(valid))


def qkv(seed, batch, length, heads, kv_heads, dim, dtype):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)  # noqa: E731
    return normal(batch, length, heads, dim), normal(batch, length, kv_heads, dim), normal(batch, length, kv_heads, dim)


def reference(q, k, v, rule, segments):
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    return attention.segment_attention(f32(q), f32(k), f32(v), rule, segments, impl="reference")


# (layout, rule, head_dim, query groups, diffusion block, block_q, block_k, dtype); sequence
# lengths are not multiples of the tiles (padding path) and give 2-7 tiles per side (tile
# skipping). Each dtype meets both head dims, several GQA ratios and block sizes.
CASES = {
    "train-d64-g1-b4-f32": ("train", MaskRule.BLOCK_DIFFUSION, 64, 1, 4, 16, 16, jnp.float32),
    "train-d128-g4-b8-f32": ("train", MaskRule.BLOCK_DIFFUSION, 128, 4, 8, 16, 32, jnp.float32),
    "train-original-d64-g8-b16-bf16": ("train-original", MaskRule.BLOCK_DIFFUSION, 64, 8, 16, 32, 16, jnp.bfloat16),
    "prefill-d128-g8-b32-bf16": ("prefill", MaskRule.BLOCK_DIFFUSION, 128, 8, 32, 32, 32, jnp.bfloat16),
    "prefill-d64-g4-b4-bf16": ("prefill", MaskRule.BLOCK_DIFFUSION, 64, 4, 4, 16, 16, jnp.bfloat16),
    "full-d64-g4-f32": ("full", MaskRule.FULL, 64, 4, 4, 16, 16, jnp.float32),
}


def make_segments(layout, block, seed=0):
    if layout == "train":
        return training_layout(seed, 3, 11, 12, block)  # T = 35
    if layout == "train-original":
        return training_layout(seed, 3, 21, 24, block, BlockAlignment.ORIGINAL)  # T = 69
    if layout == "prefill":
        return prefill_layout(seed, 3, 70 if block == 32 else 37, block)
    return full_layout(seed, 3, 37)


@pytest.mark.parametrize("backend", ["tpu", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_segment_kernel_forward_matches_reference(case, backend):
    layout, rule, dim, groups, block, block_q, block_k, dtype = CASES[case]
    segments = make_segments(layout, block)
    batch, length = segments.shape
    kv_heads = 2 if groups < 8 else 1
    q, k, v = qkv(dim + groups, batch, length, groups * kv_heads, kv_heads, dim, dtype)
    run = jax.jit(lambda q, k, v, s: dispatch.segment_attention(
        q, k, v, rule, s, backend=backend, interpret=True, block_q=block_q, block_k=block_k))
    out = run(q, k, v, segments)
    assert out.shape == q.shape and out.dtype == dtype
    assert bool(jnp.isfinite(out.astype(jnp.float32)).all())
    assert relative_error(out, reference(q, k, v, rule, segments)) < FWD_BOUND[dtype]


GRAD_CASES = [
    ("tpu", "train", 64, 4, 4, jnp.float32),
    ("triton", "train", 64, 4, 4, jnp.float32),
    ("tpu", "prefill", 128, 1, 8, jnp.bfloat16),
    ("triton", "full", 64, 8, 4, jnp.bfloat16),
]


@pytest.mark.parametrize("backend,layout,dim,groups,block,dtype", GRAD_CASES)
def test_segment_kernel_gradients_match_reference(backend, layout, dim, groups, block, dtype):
    rule = MaskRule.FULL if layout == "full" else MaskRule.BLOCK_DIFFUSION
    segments = make_segments(layout, block, seed=1)
    batch, length = segments.shape
    kv_heads = 2 if groups < 8 else 1
    q, k, v = qkv(5, batch, length, groups * kv_heads, kv_heads, dim, dtype)
    cotangent = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape), jnp.float32)

    def loss(attend, q, k, v):
        return jnp.sum(attend(q, k, v).astype(jnp.float32) * cotangent)

    kernel = lambda q, k, v: dispatch.segment_attention(  # noqa: E731
        q, k, v, rule, segments, backend=backend, interpret=True, block_q=16, block_k=16)
    ours = jax.jit(jax.grad(lambda *a: loss(kernel, *a), argnums=(0, 1, 2)))(q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = jax.grad(lambda *a: loss(lambda q, k, v: reference(q, k, v, rule, segments), *a), argnums=(0, 1, 2))(*f32)
    for name, a, b in zip("qkv", ours, ref):
        assert a.dtype == dtype
        assert bool(jnp.isfinite(a.astype(jnp.float32)).all()), name
        assert relative_error(a, b) < GRAD_BOUND[dtype], name


def dense_tiles(mask, block_q, block_k):
    batch, length, _ = mask.shape
    tiles = mask.reshape(batch, length // block_q, block_q, length // block_k, block_k)
    return tiles.any(axis=(2, 4)), tiles.all(axis=(2, 4))


@pytest.mark.parametrize("layout,rule", [
    ("train", MaskRule.BLOCK_DIFFUSION), ("train-original", MaskRule.BLOCK_DIFFUSION),
    ("prefill", MaskRule.BLOCK_DIFFUSION), ("full", MaskRule.FULL)])
def test_tile_tables_are_safe_and_skip_work(layout, rule):
    """`work` covers every visible pair, `full` only all-visible tiles; tiles really are skipped."""
    segments = make_segments(layout, 4, seed=2)
    length = segments.shape[1]
    padded = -(-length // 8) * 8
    tables = segment.build_tables(rule, segments, length, padded, 8, 8)
    pad = lambda x, value: jnp.pad(x, ((0, 0), (0, padded - length)), constant_values=value)  # noqa: E731
    padded_segments = Segments(pad(segments.block, 0), pad(segments.kind, 0), pad(segments.valid, False))
    mask = np.array(masks.dense_mask(rule, padded_segments, padded_segments, self_attention=False))
    mask[:, length:, :] = False  # padding queries are discarded
    any_visible, _ = dense_tiles(mask, 8, 8)
    real_rows = np.broadcast_to((np.arange(padded) < length)[None, :, None], mask.shape)
    _, all_visible = dense_tiles(mask | ~real_rows, 8, 8)
    work, full = segment.tile_flags(rule, tables.q_code, tables.k_code, jnp.arange(padded) < length, 8, 8)
    work, full = np.asarray(work), np.asarray(full)
    assert not np.any(any_visible & ~work), "a tile with visible pairs would be skipped"
    assert not np.any(full & ~all_visible), "a tile with masked pairs would skip the mask"
    assert work.mean() < 0.9 and full.any()
    # the compacted table lists exactly the work tiles of each query tile, in order
    count = np.asarray(tables.fwd_count)
    columns = np.asarray(tables.fwd_table) // 2
    for b, i in np.ndindex(count.shape):
        np.testing.assert_array_equal(columns[b, i, :count[b, i]], np.flatnonzero(work[b, i]))
    np.testing.assert_array_equal(np.asarray(tables.bwd_count), work.sum(1))


def test_segment_attention_under_a_mesh_shards_batch_and_heads():
    """On a (data=2, tensor=2) mesh of CPU devices the kernel runs under shard_map (the mesh comes
    from the inputs' shardings, or from `jax.set_mesh`): same result as the reference."""
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
    segments = training_layout(4, 4, 9, 8, 4)
    q, k, v = qkv(6, 4, 25, 4, 2, 32, jnp.float32)
    spec = NamedSharding(mesh, P("data", None, "tensor", None))
    sharded = [jax.device_put(x, spec) for x in (q, k, v)] + [jax.device_put(segments, NamedSharding(mesh, P("data")))]
    run = jax.jit(lambda q, k, v, s: dispatch.segment_attention(q, k, v, MaskRule.BLOCK_DIFFUSION, s, interpret=True))
    assert "sdy.manual_computation" in run.lower(*sharded).as_text()
    with jax.set_mesh(mesh):  # uncommitted inputs: the context mesh
        assert "sdy.manual_computation" in run.lower(q, k, v, segments).as_text()
    out = run(*sharded)
    assert out.sharding.spec == P("data", None, "tensor", None)
    assert relative_error(out, reference(q, k, v, MaskRule.BLOCK_DIFFUSION, segments)) < FWD_BOUND[jnp.float32]


def test_segment_kernel_rejects_bad_inputs():
    segments = training_layout(0, 2, 5, 4, 4)
    q, k, v = qkv(0, 2, 13, 4, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="segments shape"):
        segment.flash_attention(q, k, v, MaskRule.BLOCK_DIFFUSION, segments[:, :5], interpret=True)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        segment.flash_attention(q[:, :, :3], k, v, MaskRule.BLOCK_DIFFUSION, segments, interpret=True)
    with pytest.raises(ValueError, match="k .* and v"):
        segment.flash_attention(q, k, v[:, :5], MaskRule.BLOCK_DIFFUSION, segments, interpret=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        segment.flash_attention(q, k, v, MaskRule.BLOCK_DIFFUSION, segments, backend="tpu", block_q=8, block_k=8)
    with pytest.raises(ValueError, match="powers of two"):
        segment.flash_attention(q, k, v, MaskRule.BLOCK_DIFFUSION, segments, backend="triton", block_q=24)
    with pytest.raises(ValueError, match="attention_impl"):
        attention.segment_attention(q, k, v, MaskRule.BLOCK_DIFFUSION, segments, impl="flash")


def test_auto_impl_is_reference_on_cpu():
    assert attention.resolve_impl("auto") == "reference"
    assert attention.resolve_impl("pallas") == "pallas"


def test_model_logits_with_pallas_equal_reference():
    """The tiny model on the training layout: impl="pallas" (interpret) == impl="reference"."""
    config = dataclasses.replace(TINY_MODEL, attention_impl="reference")
    graphdef, params = nnx.split(transformer.init_model(config, seed=0))
    pallas_graphdef, _ = nnx.split(transformer.init_model(dataclasses.replace(config, attention_impl="pallas"), seed=0))
    prompt_valid = np.array([[True] * 9, [False] * 4 + [True] * 5])
    block_ids, kind, valid, positions = masks.training_segments(prompt_valid, 8, 4)
    segments = Segments(jnp.asarray(block_ids), jnp.asarray(kind), jnp.asarray(valid))
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, config.vocab_size, block_ids.shape))
    ours = transformer.apply(pallas_graphdef, params, tokens, jnp.asarray(positions), segments)
    ref = transformer.apply(graphdef, params, tokens, jnp.asarray(positions), segments)
    assert relative_error(ours, ref) < 1e-5

"""The cached full-attention forward's attention on the decode kernel
(`ops.pallas.dispatch.visible_keys_attention`: a query span against a prefix and suffix cache)
against the reference (`ops.attention.masked_attention` over the canvas' columns in order).

Interpret mode (TPU and Triton variants) on CPU; then the real compilers without the hardware: XLA:TPU
and Mosaic for a v5p slice on a (data 2, tensor 2) mesh (libtpu's topologies), and the Triton
lowering for "cuda". Error metric and bounds as in test_pallas_decode: max |kernel - reference| /
max |reference|, 2e-6 for float32 inputs, 1.5e-2 for bfloat16. Columns nobody may see hold NaN.
"""

from __future__ import annotations

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test processes may hold libtpu

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from tradojax.ops import attention  # noqa: E402
from tradojax.ops.pallas import dispatch  # noqa: E402

REL_BOUND = {jnp.float32: 2e-6, jnp.bfloat16: 1.5e-2}


def relative_error(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


def span_inputs(seed, batch, columns, width, own, heads, kv_heads, dim, dtype):
    """A canvas of `columns` keys, a span of `width` queries at a per-test start whose first `own`
    keys are the block; each row sees a random subset of the other columns (left pads, a horizon)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)  # noqa: E731
    start = int(rng.integers(1, columns - width))
    visible = rng.random((batch, columns)) < 0.6
    visible[:, start:start + own] = True
    visible[0] = False  # a row that sees only the block
    visible[0, start:start + own] = True
    keys, values = normal(batch, columns, kv_heads, dim), normal(batch, columns, kv_heads, dim)
    hidden = jnp.asarray(~visible)[:, :, None, None]
    keys, values = jnp.where(hidden, jnp.nan, keys).astype(dtype), jnp.where(hidden, jnp.nan, values).astype(dtype)
    return normal(batch, width, heads, dim), keys, values, jnp.asarray(visible), jnp.int32(start)


def reference(q, keys, values, visible):
    f32 = lambda x: jnp.where(jnp.isnan(x), 0, x.astype(jnp.float32))  # noqa: E731 (the mask hides them)
    mask = jnp.broadcast_to(visible[:, None, :], (q.shape[0], q.shape[1], visible.shape[1]))
    with jax.default_matmul_precision("highest"):
        return attention.masked_attention(f32(q), f32(keys), f32(values), mask)


def kernel(q, keys, values, visible, start, own, backend):
    packing = dispatch.pack_visible_keys(visible, start, own)
    own_keys = jax.lax.dynamic_slice_in_dim(keys, start, own, axis=1)
    own_values = jax.lax.dynamic_slice_in_dim(values, start, own, axis=1)
    return dispatch.visible_keys_attention(q, keys, values, packing, own_keys, own_values, backend=backend,
                                           interpret=True, block_k=16)


# (head_dim, query groups, span width, own keys, dtype); 72 x 2 rows exceed a Triton call's 128: chunks
CASES = [(64, 1, 4, 4, jnp.float32), (128, 2, 72, 5, jnp.float32), (64, 4, 9, 5, jnp.bfloat16)]


@pytest.mark.parametrize("backend", ["tpu", "triton"])
@pytest.mark.parametrize("dim,groups,width,own,dtype", CASES)
def test_span_attention_matches_the_reference(backend, dim, groups, width, own, dtype):
    q, keys, values, visible, start = span_inputs(dim + width, 3, 100, width, own, 2 * groups, 2, dim, dtype)
    out = jax.jit(kernel, static_argnames=("own", "backend"))(q, keys, values, visible, start, own=own, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert relative_error(out, reference(q, keys, values, visible)) < REL_BOUND[dtype]


def test_packing_lists_the_visible_columns_in_order():
    visible = jnp.asarray([[0, 1, 1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]], bool)
    order, lengths = dispatch.pack_visible_keys(visible, jnp.int32(2), 2)  # columns 2, 3 are the block's
    np.testing.assert_array_equal(lengths, [3, 6])
    np.testing.assert_array_equal(order[0, :3], [1, 5, 6])
    np.testing.assert_array_equal(order[1, :6], [0, 1, 4, 5, 6, 7])


# ----------------------------------------------------------------------------------------------
# The real compilers
# ----------------------------------------------------------------------------------------------

BATCH, COLUMNS, WIDTH, OWN, HEADS, KV_HEADS, DIM = 4, 512, 40, 33, 8, 2, 128


def _attend(q, keys, values, visible, start):  # the platform's kernel, as the sampler calls it
    own_keys = jax.lax.dynamic_slice_in_dim(keys, start, OWN, axis=1)
    own_values = jax.lax.dynamic_slice_in_dim(values, start, OWN, axis=1)
    return dispatch.visible_keys_attention(q, keys, values, dispatch.pack_visible_keys(visible, start, OWN),
                                           own_keys, own_values)


def test_span_attention_compiles_with_mosaic_on_a_sharded_tpu_slice():
    from tradojax.aot import tpu_devices
    from tradojax.config import MeshConfig
    from tradojax.parallel.mesh import make_mesh

    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), tpu_devices("v5p:2x2x1"))

    def rows(shape, dtype, *rest):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P("data", *rest)))

    q = rows((BATCH, WIDTH, HEADS, DIM), jnp.bfloat16, None, "tensor", None)
    keys = rows((BATCH, COLUMNS, KV_HEADS, DIM), jnp.bfloat16, None, "tensor", None)
    visible = rows((BATCH, COLUMNS), jnp.bool_, None)
    start = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    compiled = jax.jit(_attend).lower(q, keys, keys, visible, start).compile()
    text = compiled.as_text()
    assert "tpu_custom_call" in text and "block_decode_attention" in text


def test_span_attention_lowers_to_triton_for_cuda():
    sds = jax.ShapeDtypeStruct
    lowered = jax.jit(_attend).trace(
        sds((BATCH, WIDTH, HEADS, DIM), jnp.bfloat16), sds((BATCH, COLUMNS, KV_HEADS, DIM), jnp.bfloat16),
        sds((BATCH, COLUMNS, KV_HEADS, DIM), jnp.bfloat16), sds((BATCH, COLUMNS), jnp.bool_), sds((), jnp.int32),
    ).lower(lowering_platforms=("cuda",))
    # 40 columns x 4 query heads per KV head = 160 rows: two Triton calls of 32 columns
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 2

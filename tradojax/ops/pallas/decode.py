"""Cached block-diffusion decode attention: the current block's queries against the KV cache.

For each sequence i, the b queries of the current block (all heads) see cache slots
[0, length[i]) and the block's own b keys, bidirectionally (spec section 2.4, the DENOISE call).
The cache is contiguous per sequence ([B, S, Hkv, D], sequence i's tokens at slots [0, length[i])),
as `models.transformer.KVCache` stores it.

GQA: the G = H / Hkv query heads of a KV head are stacked with the block's b positions into
b * G rows, so each K/V tile read from HBM feeds one [b*G, tile] matmul per KV head.

TPU (Mosaic): grid (sequence, KV tile). Lengths are scalar-prefetched; the cache `index_map`
clamps the tile index to the sequence's last valid tile, so the steps past the length re-use the
block already in VMEM (no DMA) and `pl.when` skips their compute. One step reads a contiguous
[tile, Hkv * D] slab of the cache (all KV heads), which keeps DMAs large.

GPU (Pallas Triton): grid (sequence, KV head); the kernel loops over exactly
ceil(length / tile) tiles with masked loads, so nothing past the length is read.

Cache slots at or past a sequence's length are never mixed into the result, even when they hold
NaN (the last partial tile masks both scores and values).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

BACKENDS = ("tpu", "triton")
_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))


def _dot(a, b, dims):
    # explicit precision: a global "highest" default would ask Mosaic for fp32 passes on bf16
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def default_block_k(slots: int, backend: str) -> int:
    """The KV tile. TPU: the largest of 512..16 dividing the cache, else the whole cache when it
    is at most 512 slots, else 512 with a partial last tile. GPU: 64. A tile need not divide the
    cache: slots past a sequence's length (and past the cache) are masked out."""
    if backend == "triton":
        return 64
    for tile in (512, 256, 128, 64, 32, 16):
        if slots % tile == 0:
            return tile
    return slots if slots <= 512 else 512


# ----------------------------------------------------------------------------------------------
# TPU
# ----------------------------------------------------------------------------------------------


def _tpu_decode_kernel(lengths_ref, q_ref, k_cache_ref, v_cache_ref, k_block_ref, v_block_ref,
                       o_ref, m_scr, l_scr, acc_scr, *, scale, block_k, num_tiles, kv_heads, dim):
    i, t = pl.program_id(0), pl.program_id(1)
    length = lengths_ref[i]

    @pl.when(t == 0)
    def _own_block():  # always visible: after it every row's running max is finite
        for h in range(kv_heads):
            scores = _dot(q_ref[h], k_block_ref[h].astype(q_ref.dtype), _NT) * scale
            m = scores.max(axis=-1, keepdims=True)
            p = jnp.exp(scores - m)
            m_scr[h] = m
            l_scr[h] = p.sum(axis=-1, keepdims=True)
            v = v_block_ref[h].astype(q_ref.dtype)
            acc_scr[h] = _dot(p.astype(v.dtype), v, _NN)

    def cache_tile(partial: bool):
        start = t * block_k
        for h in range(kv_heads):
            k = k_cache_ref[:, h, :].astype(q_ref.dtype)
            v = v_cache_ref[:, h, :].astype(q_ref.dtype)
            scores = _dot(q_ref[h], k, _NT) * scale
            if partial:
                row_slots = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
                col_slots = start + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
                scores = jnp.where(row_slots < length, scores, -jnp.inf)
                v = jnp.where(col_slots < length, v, jnp.zeros_like(v))
            m_prev = m_scr[h]
            m_new = jnp.maximum(m_prev, scores.max(axis=-1, keepdims=True))
            alpha = jnp.exp(m_prev - m_new)
            p = jnp.exp(scores - m_new)
            l_scr[h] = alpha * l_scr[h] + p.sum(axis=-1, keepdims=True)
            acc_scr[h] = alpha * acc_scr[h] + _dot(p.astype(v.dtype), v, _NN)
            m_scr[h] = m_new

    whole = (t + 1) * block_k <= length
    pl.when(whole)(lambda: cache_tile(False))
    pl.when(jnp.logical_not(whole) & (t * block_k < length))(lambda: cache_tile(True))

    @pl.when(t == num_tiles - 1)
    def _write():
        for h in range(kv_heads):
            o_ref[h] = (acc_scr[h] / l_scr[h]).astype(o_ref.dtype)


def _tpu_decode(q, k_cache, v_cache, lengths, k_block, v_block, *, scale, block_k, interpret):
    """q [B, Hkv, R, D]; caches [B, S, Hkv, D]; k/v_block [B, Hkv, b, D] -> [B, Hkv, R, D]."""
    batch, kv_heads, rows, dim = q.shape
    slots = k_cache.shape[1]
    block = k_block.shape[2]
    num_tiles = pl.cdiv(slots, block_k)  # a partial last tile reads padding: masked like stale slots
    def cache_index(i, t, lengths_ref):
        last = jnp.maximum((lengths_ref[i] + block_k - 1) // block_k - 1, 0)
        return (i, jnp.minimum(t, last), 0, 0)

    whole_seq = lambda i, t, lengths_ref: (i, 0, 0, 0)  # noqa: E731
    # [tile, Hkv, D] of the cache as stored: no relayout copy of the cache in HBM
    cache_spec = pl.BlockSpec((None, block_k, kv_heads, dim), cache_index)
    kernel = functools.partial(_tpu_decode_kernel, scale=scale, block_k=block_k, num_tiles=num_tiles,
                               kv_heads=kv_heads, dim=dim)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(batch, num_tiles),
            in_specs=[pl.BlockSpec((None, kv_heads, rows, dim), whole_seq), cache_spec, cache_spec,
                      pl.BlockSpec((None, kv_heads, block, dim), whole_seq),
                      pl.BlockSpec((None, kv_heads, block, dim), whole_seq)],
            out_specs=pl.BlockSpec((None, kv_heads, rows, dim), whole_seq),
            scratch_shapes=[pltpu.VMEM((kv_heads, rows, 1), jnp.float32),
                            pltpu.VMEM((kv_heads, rows, 1), jnp.float32),
                            pltpu.VMEM((kv_heads, rows, dim), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret, name="block_decode_attention",
    )(lengths, q, k_cache, v_cache, k_block, v_block)


# ----------------------------------------------------------------------------------------------
# GPU (Triton)
# ----------------------------------------------------------------------------------------------


def _triton_decode_kernel(q_ref, k_cache_ref, v_cache_ref, k_block_ref, v_block_ref, length_ref, o_ref,
                          *, scale, block_k, block):
    q = q_ref[...]
    length = length_ref[...]
    # the block's own keys (padded to a power of two >= 16 for tl.dot; the padding is masked)
    scores = _dot(q, k_block_ref[...].astype(q.dtype), _NT) * scale
    own = lax.broadcasted_iota(jnp.int32, (1, scores.shape[1]), 1) < block
    scores = jnp.where(own, scores, -jnp.inf)
    m = scores.max(axis=-1, keepdims=True)
    p = jnp.exp(scores - m)
    l = p.sum(axis=-1, keepdims=True)
    acc = _dot(p.astype(q.dtype), v_block_ref[...].astype(q.dtype), _NN)

    def body(j, carry):
        m, l, acc = carry
        start = pl.multiple_of(j * block_k, block_k)
        slots = start + jnp.arange(block_k, dtype=jnp.int32)
        live = slots < length
        k = plgpu.load(k_cache_ref.at[pl.ds(start, block_k), :], mask=live[:, None], other=0.0)
        v = plgpu.load(v_cache_ref.at[pl.ds(start, block_k), :], mask=live[:, None], other=0.0)
        scores = _dot(q, k.astype(q.dtype), _NT) * scale
        scores = jnp.where(live[None, :], scores, -jnp.inf)
        m_new = jnp.maximum(m, scores.max(axis=-1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(scores - m_new)
        return (m_new, alpha * l + p.sum(axis=-1, keepdims=True),
                alpha * acc + _dot(p.astype(q.dtype), v.astype(q.dtype), _NN))

    m, l, acc = lax.fori_loop(0, (length + block_k - 1) // block_k, body, (m, l, acc))
    o_ref[...] = (acc / l).astype(o_ref.dtype)


def _triton_decode(q, k_cache, v_cache, lengths, k_block, v_block, *, scale, block_k, interpret,
                   num_warps=4, num_stages=2):
    batch, kv_heads, rows, dim = q.shape
    slots = k_cache.shape[1]
    block = k_block.shape[2]
    if dim & (dim - 1) or block_k & (block_k - 1) or block_k < 16:
        raise ValueError(f"Triton decode needs a power-of-two head_dim ({dim}) and block_k >= 16 ({block_k})")
    padded_rows = max(16, pl.next_power_of_2(rows))
    padded_block = max(16, pl.next_power_of_2(block))
    q = jnp.pad(q, ((0, 0), (0, 0), (0, padded_rows - rows), (0, 0)))
    pad_block = ((0, 0), (0, 0), (0, padded_block - block), (0, 0))
    k_block, v_block = jnp.pad(k_block, pad_block), jnp.pad(v_block, pad_block)
    per_head = pl.BlockSpec((None, None, padded_rows, dim), lambda i, h: (i, h, 0, 0))
    cache_spec = pl.BlockSpec((None, slots, None, dim), lambda i, h: (i, 0, h, 0))
    block_spec = pl.BlockSpec((None, None, padded_block, dim), lambda i, h: (i, h, 0, 0))
    out = pl.pallas_call(
        functools.partial(_triton_decode_kernel, scale=scale, block_k=block_k, block=block),
        grid=(batch, kv_heads),
        in_specs=[per_head, cache_spec, cache_spec, block_spec, block_spec,
                  pl.BlockSpec((None,), lambda i, h: (i,))],
        out_specs=per_head,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="block_decode_attention",
    )(q, k_cache, v_cache, k_block, v_block, lengths)
    return out[:, :, :rows]


# ----------------------------------------------------------------------------------------------
# Public entry
# ----------------------------------------------------------------------------------------------


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                     k_block: jax.Array, v_block: jax.Array, *, backend: str = "tpu",
                     interpret: bool = False, block_k: int | None = None,
                     scale: float | None = None) -> jax.Array:
    """Block queries q [B, b, H, D] against cache slots [0, lengths) and every block key.

    k_cache, v_cache: [B, S, Hkv, D]; lengths: [B] int32 (<= S); k_block, v_block: [B, n, Hkv, D],
    all visible to every query (n = b for a plain decode step; n = 2b for the fused save, where the
    current block also sees the decided block). Returns [B, b, H, D] in q's dtype (cache values are
    cast to q's dtype inside the kernel).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    batch, block, heads, dim = q.shape
    if k_cache.shape != v_cache.shape or k_cache.ndim != 4 or k_cache.shape[0] != batch or k_cache.shape[3] != dim:
        raise ValueError(f"k_cache {k_cache.shape} / v_cache {v_cache.shape} must be [B={batch}, S, Hkv, D={dim}]")
    kv_heads = k_cache.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    if (k_block.ndim != 4 or k_block.shape[0] != batch or k_block.shape[2:] != (kv_heads, dim)
            or v_block.shape != k_block.shape):
        raise ValueError(f"k_block {k_block.shape} / v_block {v_block.shape} must be [B={batch}, n, Hkv={kv_heads}, D={dim}]")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths shape {lengths.shape} must be [B] = {(batch,)}")
    groups = heads // kv_heads
    slots = k_cache.shape[1]
    block_k = block_k or default_block_k(slots, backend)
    scale = float(dim ** -0.5 if scale is None else scale)
    # [B, b, Hkv, G, D] -> [B, Hkv, b * G, D]: the rows of one KV head, block position major
    q_rows = q.reshape(batch, block, kv_heads, groups, dim).transpose(0, 2, 1, 3, 4)
    q_rows = q_rows.reshape(batch, kv_heads, block * groups, dim)
    k_rows, v_rows = k_block.transpose(0, 2, 1, 3), v_block.transpose(0, 2, 1, 3)
    run = _tpu_decode if backend == "tpu" else _triton_decode
    out = run(q_rows, k_cache, v_cache, lengths.astype(jnp.int32), k_rows, v_rows,
              scale=scale, block_k=block_k, interpret=interpret)
    out = out.reshape(batch, kv_heads, block, groups, dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, block, heads, dim)

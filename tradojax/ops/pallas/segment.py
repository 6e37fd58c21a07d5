"""Flash attention under a mask rule over per-token `Segments` (training, prefill, uncached forward).

One kernel covers every self-attention layout of the project: the training rule
`[prompt | clean | noisy]` and the inference block-causal rule (both `MaskRule.BLOCK_DIFFUSION`)
and `MaskRule.FULL`. The kernel takes the segment ids as inputs and evaluates `masks.visible` on
each (query tile, key tile) pair, so one compiled kernel serves every batch whatever its prompt
lengths, left pads or block alignment.

Tile skipping. Before the kernel runs, per-tile summaries of the segment ids (min/max block per
token kind) decide, for every (batch row, query tile, key tile), whether the tile can hold a
visible pair ("work") and whether every pair is visible ("full": the mask is not evaluated).
The work tiles of each query tile are compacted into a table that the kernels walk: on TPU the
table is scalar-prefetched and drives the K/V `index_map` (a skipped step repeats the previous
block index, so Pallas issues no DMA for it, and `pl.when` skips its compute); on GPU the kernel
loops over exactly `count` table entries. The backward pass uses the transposed table (for each
key tile, the query tiles that see it).

Rows that see no key at all get output 0 from the kernel and their log-sum-exp is +inf (so the
backward pass gives them zero probability); the self-attention fallback (`masks.self_only`) is
applied by the caller (`dispatch.segment_attention`), outside the kernel.

Layouts: the TPU (Mosaic) kernels work on [B, heads, T, D] (blocks whose last two dims are
(tile, D)); the GPU (Triton) kernels read the model's native [B, T, heads, D] through strided
blocks. Per-query vectors (segment codes, log-sum-exp, delta) are stored as rows [B, *, 1, T] on
TPU (a [T, 1] column would be padded to 128 lanes in HBM) and transposed in VMEM where needed.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from tradojax.ops import masks
from tradojax.ops.masks import CLEAN, CONTEXT, NOISY, MaskRule, Segments

INVALID = 3  # the kind code of a key that no query may see (padding)
_BIG = 1 << 30  # sentinel block id of an empty min/max (real block ids are far smaller)
_LANES = 128
BACKENDS = ("tpu", "triton")


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Static parameters of one flash-attention call (hashable: it is a `custom_vjp` nondiff arg)."""

    rule: MaskRule
    backend: str  # "tpu" (Mosaic) or "triton" (GPU)
    interpret: bool
    block_q: int
    block_k: int
    scale: float
    num_warps: int = 4
    num_stages: int = 2


def default_blocks(length: int, backend: str) -> tuple[int, int]:
    """(block_q, block_k) for a sequence of `length` tokens, legal for the backend's compiler.

    TPU: one tile up to 512 tokens (full-dimension blocks are always legal), otherwise 512/256/128
    (last block dims must be multiples of 128 for the row-layout segment codes and lse).
    Triton: powers of two >= 16 (tl.dot needs M, N, K >= 16).
    """
    if backend == "tpu":
        if length <= 512:
            tile = _round_up(length, 16)
            return tile, tile
        padded = _round_up(length, _LANES)
        tile = next(t for t in (512, 256, 128) if padded % t == 0)
        return tile, tile
    tile = max(16, min(64, pl.next_power_of_2(length)))
    return tile, tile


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _check_blocks(backend: str, interpret: bool, block_q: int, block_k: int, padded_length: int) -> None:
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block_q/block_k must be >= 1, got {block_q}/{block_k}")
    if interpret:
        return
    if backend == "tpu":
        for name, tile in (("block_q", block_q), ("block_k", block_k)):
            if tile != padded_length and tile % _LANES:
                raise ValueError(f"{name}={tile}: on TPU a tile must be a multiple of {_LANES} or the "
                                 f"whole (padded) sequence ({padded_length})")
    else:
        for name, tile in (("block_q", block_q), ("block_k", block_k)):
            if tile < 16 or tile & (tile - 1):
                raise ValueError(f"{name}={tile}: Triton tiles must be powers of two >= 16")


# ----------------------------------------------------------------------------------------------
# Segment codes and tile tables
# ----------------------------------------------------------------------------------------------


def token_codes(segments: Segments) -> tuple[jax.Array, jax.Array]:
    """Packs (block, kind[, valid]) into one int32 per token: `block * 4 + kind`.

    Query codes keep the kind whatever the validity (a pad query still follows the rule, as in the
    dense reference); key codes use kind INVALID (3) for padding, which `visible` rejects.
    """
    block = segments.block.astype(jnp.int32)
    kind = segments.kind.astype(jnp.int32)
    q_code = block * 4 + kind
    k_code = block * 4 + jnp.where(segments.valid, kind, INVALID)
    return q_code, k_code


def tile_mask(rule: MaskRule, q_code: jax.Array, k_code: jax.Array) -> jax.Array:
    """`masks.visible` on packed codes (broadcasting), as the kernels evaluate it on a tile."""
    k_kind = k_code & 3
    return masks.visible(rule, q_code >> 2, q_code & 3, k_code >> 2, k_kind, k_kind != INVALID)


def tile_flags(rule: MaskRule, q_code: jax.Array, k_code: jax.Array, q_real: jax.Array,
               block_q: int, block_k: int) -> tuple[jax.Array, jax.Array]:
    """(work, full), each [B, nq, nk] bool, from per-tile min/max block ids per kind.

    `work` is False only where no pair of the tile is visible; `full` is True only where every
    pair is (so the kernel can skip evaluating the mask). Both are conservative in the safe
    direction. `q_real` [T] excludes the queries added by padding.
    """
    batch, length = q_code.shape
    nq, nk = length // block_q, length // block_k
    k_kind = (k_code & 3).reshape(batch, nk, block_k)
    k_block = (k_code >> 2).reshape(batch, nk, block_k)
    k_valid = k_kind != INVALID
    all_valid = k_valid.all(-1)[:, None, :]
    if rule is MaskRule.FULL:
        work = jnp.broadcast_to(k_valid.any(-1)[:, None, :], (batch, nq, nk))
        return work, work & all_valid

    q_kind = (q_code & 3).reshape(batch, nq, block_q)
    q_block = (q_code >> 2).reshape(batch, nq, block_q)
    real = jnp.broadcast_to(q_real.reshape(1, nq, block_q), q_kind.shape)

    def tmax(values, where):
        return jnp.max(jnp.where(where, values, -_BIG), axis=-1)

    def tmin(values, where):
        return jnp.min(jnp.where(where, values, _BIG), axis=-1)

    q_noisy = real & (q_kind == NOISY)
    q_other = real & (q_kind != NOISY)
    # query-tile summaries [B, nq, 1]; key-tile summaries [B, 1, nk]
    cn_max, cn_min = tmax(q_block, q_other)[..., None], tmin(q_block, q_other)[..., None]
    n_max, n_min = tmax(q_block, q_noisy)[..., None], tmin(q_block, q_noisy)[..., None]
    ctx, clean, noisy = k_kind == CONTEXT, k_kind == CLEAN, k_kind == NOISY
    ctx_min, ctx_max = tmin(k_block, ctx)[:, None], tmax(k_block, ctx)[:, None]
    clean_min, clean_max = tmin(k_block, clean)[:, None], tmax(k_block, clean)[:, None]
    noisy_min, noisy_max = tmin(k_block, noisy)[:, None], tmax(k_block, noisy)[:, None]

    work = ((ctx_min <= jnp.maximum(cn_max, n_max))
            | (clean_min <= cn_max)
            | (clean_min < n_max)
            | ((noisy_min <= n_max) & (noisy_max >= n_min)))
    no_noisy_keys = noisy_min == _BIG
    other_queries_see_all = (cn_max == -_BIG) | (no_noisy_keys & (jnp.maximum(ctx_max, clean_max) <= cn_min))
    single_noisy_block = (noisy_min == noisy_max) & (n_min == n_max) & (noisy_min == n_min)
    noisy_queries_see_all = (n_max == -_BIG) | (
        (ctx_max <= n_min) & (clean_max < n_min) & (no_noisy_keys | single_noisy_block))
    full = work & all_valid & other_queries_see_all & noisy_queries_see_all
    return work, full


def compact_table(work: jax.Array, full: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row of `work` [B, R, C]: the work columns in increasing order, padded by repeating the
    last one (so a skipped grid step re-uses the block already in VMEM), as `column * 2 + full`.

    Returns (table [B, R, C] int32, count [B, R] int32).
    """
    columns = work.shape[-1]
    count = work.sum(-1).astype(jnp.int32)
    order = jnp.argsort(~work, axis=-1, stable=True).astype(jnp.int32)
    steps = jnp.arange(columns, dtype=jnp.int32)
    pick = jnp.minimum(steps, jnp.maximum(count - 1, 0)[..., None])
    column = jnp.take_along_axis(order, pick, axis=-1)
    is_full = jnp.take_along_axis(full, column, axis=-1)
    return column * 2 + is_full.astype(jnp.int32), count


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tables:
    """Everything the kernels need besides q, k, v: padded codes and the two step tables."""

    q_code: jax.Array  # [B, Tp] int32
    k_code: jax.Array  # [B, Tp] int32
    fwd_table: jax.Array  # [B, nq, nk]: for each query tile, its key tiles (forward, dq)
    fwd_count: jax.Array  # [B, nq]
    bwd_table: jax.Array  # [B, nk, nq]: for each key tile, its query tiles (dk, dv)
    bwd_count: jax.Array  # [B, nk]


def build_tables(rule: MaskRule, segments: Segments, length: int, padded_length: int,
                 block_q: int, block_k: int) -> Tables:
    """Codes padded to `padded_length` (pad queries: CONTEXT block -1; pad keys: INVALID) and tables."""
    q_code, k_code = token_codes(segments)
    pad = padded_length - length
    q_code = jnp.pad(q_code, ((0, 0), (0, pad)), constant_values=-4)
    k_code = jnp.pad(k_code, ((0, 0), (0, pad)), constant_values=INVALID)
    q_real = jnp.arange(padded_length) < length
    work, full = tile_flags(rule, q_code, k_code, q_real, block_q, block_k)
    fwd_table, fwd_count = compact_table(work, full)
    bwd_table, bwd_count = compact_table(work.transpose(0, 2, 1), full.transpose(0, 2, 1))
    return Tables(q_code, k_code, fwd_table, fwd_count, bwd_table, bwd_count)


# ----------------------------------------------------------------------------------------------
# Shared online-softmax pieces
# ----------------------------------------------------------------------------------------------

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims):
    # explicit precision: a global "highest" default would ask Mosaic for fp32 passes on bf16
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _online_update(scores, m_prev, l_prev, acc_prev, v):
    """One online-softmax step over a score tile [rows, keys] (masked entries are -inf)."""
    m_new = jnp.maximum(m_prev, scores.max(axis=-1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing visible yet
    alpha = jnp.exp(m_prev - m_safe)
    p = jnp.exp(scores - m_safe)
    l_new = alpha * l_prev + p.sum(axis=-1, keepdims=True)
    acc_new = alpha * acc_prev + _dot(p.astype(v.dtype), v, _NN)
    return m_new, l_new, acc_new


def _finish(m, l, acc):
    """(output, log-sum-exp); rows that saw nothing give 0 and lse = +inf."""
    empty = l == 0.0
    out = acc * jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
    lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
    return out, lse


def _column_to_row(column):
    """[n, 1] -> [1, n] through a lane-broadcast 2-D transpose (a shape Mosaic transposes)."""
    n = column.shape[0]
    return jnp.transpose(jnp.broadcast_to(column, (n, _LANES)))[:1, :]


def _row_to_column(row):
    """[1, n] -> [n, 1]."""
    n = row.shape[1]
    return jnp.transpose(jnp.broadcast_to(row, (8, n)))[:, :1]


# ----------------------------------------------------------------------------------------------
# TPU (Mosaic) kernels: q [B, H, Tp, D], k/v [B, Hkv, Tp, D]
# ----------------------------------------------------------------------------------------------


def _tpu_forward_kernel(table_ref, count_ref, q_ref, k_ref, v_ref, q_code_ref, k_code_ref,
                        o_ref, *rest, rule, scale, nq, nk, with_lse):
    if with_lse:
        lse_ref, m_scr, l_scr, acc_scr = rest
    else:
        lse_ref, (m_scr, l_scr, acc_scr) = None, rest
    b, i, s = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * nq + i

    @pl.when(s == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    entry = table_ref[row * nk + s]

    def step(masked: bool):
        scores = _dot(q_ref[...], k_ref[...], _NT) * scale
        if masked:
            scores = jnp.where(tile_mask(rule, q_code_ref[...], k_code_ref[...]), scores, -jnp.inf)
        m, l, acc = _online_update(scores, m_scr[...], l_scr[...], acc_scr[...], v_ref[...])
        m_scr[...], l_scr[...], acc_scr[...] = m, l, acc

    active = s < count_ref[row]
    pl.when(active & (entry % 2 == 1))(lambda: step(False))
    pl.when(active & (entry % 2 == 0))(lambda: step(True))

    @pl.when(s == nk - 1)
    def _write():
        out, lse = _finish(m_scr[...], l_scr[...], acc_scr[...])
        o_ref[...] = out.astype(o_ref.dtype)
        if lse_ref is not None:
            lse_ref[...] = _column_to_row(lse)


def _tpu_forward(q, k, v, tables: Tables, cfg: FlashConfig, with_lse: bool):
    batch, heads, length, dim = q.shape
    groups = heads // k.shape[1]
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk = length // bq, length // bk

    def kv_tile(b, i, s, table):
        return table[(b * nq + i) * nk + s] // 2

    q_spec = pl.BlockSpec((None, None, bq, dim), lambda b, h, i, s, t, c: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, dim), lambda b, h, i, s, t, c: (b, h // groups, kv_tile(b, i, s, t), 0))
    in_specs = [
        q_spec, kv_spec, kv_spec,
        pl.BlockSpec((None, bq, 1), lambda b, h, i, s, t, c: (b, i, 0)),
        pl.BlockSpec((None, 1, bk), lambda b, h, i, s, t, c: (b, 0, kv_tile(b, i, s, t))),
    ]
    out_specs = [q_spec]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if with_lse:
        out_specs.append(pl.BlockSpec((None, None, 1, bq), lambda b, h, i, s, t, c: (b, h, 0, i)))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, 1, length), jnp.float32))
    kernel = functools.partial(_tpu_forward_kernel, rule=cfg.rule, scale=cfg.scale, nq=nq, nk=nk,
                               with_lse=with_lse)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(batch, heads, nq, nk), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, dim), jnp.float32)])
    outs = pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=out_shape, interpret=cfg.interpret,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        name="segment_flash_fwd",
    )(tables.fwd_table.reshape(-1), tables.fwd_count.reshape(-1), q, k, v,
      tables.q_code[:, :, None], tables.k_code[:, None, :])
    return (outs[0], outs[1]) if with_lse else (outs[0], None)


def _tpu_dq_kernel(table_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                   q_code_ref, k_code_ref, dq_ref, lse_scr, delta_scr, dq_scr, *, rule, scale, nq, nk):
    b, i, s = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * nq + i

    @pl.when(s == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)
        lse_scr[...] = _row_to_column(lse_ref[...])
        delta_scr[...] = _row_to_column(delta_ref[...])

    entry = table_ref[row * nk + s]

    def step(masked: bool):
        k = k_ref[...]
        scores = _dot(q_ref[...], k, _NT) * scale
        if masked:
            scores = jnp.where(tile_mask(rule, q_code_ref[...], k_code_ref[...]), scores, -jnp.inf)
        p = jnp.exp(scores - lse_scr[...])
        dp = _dot(do_ref[...], v_ref[...], _NT)
        ds = p * (dp - delta_scr[...])
        dq_scr[...] += _dot(ds.astype(k.dtype), k, _NN)

    active = s < count_ref[row]
    pl.when(active & (entry % 2 == 1))(lambda: step(False))
    pl.when(active & (entry % 2 == 0))(lambda: step(True))

    @pl.when(s == nk - 1)
    def _write():
        dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _tpu_dkv_kernel(table_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                    q_code_ref, k_code_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, rule, scale, nq, nk, groups):
    b, j, s = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    col = b * nk + j
    r = s % nq

    @pl.when(s == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    entry = table_ref[col * nq + r]

    def step(masked: bool):
        q, do = q_ref[...], do_ref[...]
        scores_t = _dot(k_ref[...], q, _NT) * scale  # [bk, bq]
        if masked:
            scores_t = jnp.where(tile_mask(rule, q_code_ref[...], k_code_ref[...]), scores_t, -jnp.inf)
        p_t = jnp.exp(scores_t - lse_ref[...])
        dv_scr[...] += _dot(p_t.astype(do.dtype), do, _NN)
        dp_t = _dot(v_ref[...], do, _NT)
        ds_t = p_t * (dp_t - delta_ref[...])
        dk_scr[...] += _dot(ds_t.astype(q.dtype), q, _NN)

    active = r < count_ref[col]
    pl.when(active & (entry % 2 == 1))(lambda: step(False))
    pl.when(active & (entry % 2 == 0))(lambda: step(True))

    @pl.when(s == groups * nq - 1)
    def _write():
        dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _tpu_backward(q, k, v, do, lse, delta, tables: Tables, cfg: FlashConfig):
    """dq, dk, dv; lse and delta are rows [B, H, 1, Tp] (f32)."""
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk = length // bq, length // bk
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
    q_col, k_row = tables.q_code[:, :, None], tables.k_code[:, None, :]

    # dq: the forward's grid and table
    def kv_tile(b, i, s, table):
        return table[(b * nq + i) * nk + s] // 2

    q_spec = pl.BlockSpec((None, None, bq, dim), lambda b, h, i, s, t, c: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, dim), lambda b, h, i, s, t, c: (b, h // groups, kv_tile(b, i, s, t), 0))
    row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, s, t, c: (b, h, 0, i))
    dq = pl.pallas_call(
        functools.partial(_tpu_dq_kernel, rule=cfg.rule, scale=cfg.scale, nq=nq, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(batch, heads, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                      pl.BlockSpec((None, bq, 1), lambda b, h, i, s, t, c: (b, i, 0)),
                      pl.BlockSpec((None, 1, bk), lambda b, h, i, s, t, c: (b, 0, kv_tile(b, i, s, t)))],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                            pltpu.VMEM((bq, dim), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), interpret=cfg.interpret,
        compiler_params=params, name="segment_flash_dq",
    )(tables.fwd_table.reshape(-1), tables.fwd_count.reshape(-1), q, k, v, do, lse, delta, q_col, k_row)

    # dk, dv: for each key tile, the query tiles of every head of its group
    def q_tile(b, j, s, table):
        return table[(b * nk + j) * nq + s % nq] // 2

    def q_head(hk, s):
        return hk * groups + s // nq

    gq_spec = pl.BlockSpec((None, None, bq, dim), lambda b, hk, j, s, t, c: (b, q_head(hk, s), q_tile(b, j, s, t), 0))
    gk_spec = pl.BlockSpec((None, None, bk, dim), lambda b, hk, j, s, t, c: (b, hk, j, 0))
    grow_spec = pl.BlockSpec((None, None, 1, bq), lambda b, hk, j, s, t, c: (b, q_head(hk, s), 0, q_tile(b, j, s, t)))
    dk, dv = pl.pallas_call(
        functools.partial(_tpu_dkv_kernel, rule=cfg.rule, scale=cfg.scale, nq=nq, nk=nk, groups=groups),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(batch, kv_heads, nk, groups * nq),
            in_specs=[gq_spec, gk_spec, gk_spec, gq_spec, grow_spec, grow_spec,
                      pl.BlockSpec((None, 1, bq), lambda b, hk, j, s, t, c: (b, 0, q_tile(b, j, s, t))),
                      pl.BlockSpec((None, bk, 1), lambda b, hk, j, s, t, c: (b, j, 0))],
            out_specs=[gk_spec, gk_spec],
            scratch_shapes=[pltpu.VMEM((bk, dim), jnp.float32), pltpu.VMEM((bk, dim), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=cfg.interpret, compiler_params=params, name="segment_flash_dkv",
    )(tables.bwd_table.reshape(-1), tables.bwd_count.reshape(-1), q, k, v, do, lse, delta,
      tables.q_code[:, None, :], tables.k_code[:, :, None])
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# GPU (Pallas Triton) kernels: native layouts q [B, Tp, H, D], k/v [B, Tp, Hkv, D]
# ----------------------------------------------------------------------------------------------


def _triton_forward_kernel(q_ref, k_ref, v_ref, q_code_ref, k_code_ref, table_ref, count_ref,
                           o_ref, *lse_ref, rule, scale, block_k):
    q = q_ref[...]
    q_code = q_code_ref[...][:, None]
    rows, dim = q.shape

    def body(s, carry):
        m, l, acc = carry
        start = pl.multiple_of((table_ref[s] // 2) * block_k, block_k)
        keys = pl.ds(start, block_k)
        scores = _dot(q, k_ref[keys, :], _NT) * scale
        scores = jnp.where(tile_mask(rule, q_code, k_code_ref[keys][None, :]), scores, -jnp.inf)
        return _online_update(scores, m, l, acc, v_ref[keys, :])

    init = (jnp.full((rows, 1), -jnp.inf, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, dim), jnp.float32))
    m, l, acc = lax.fori_loop(0, count_ref[...], body, init)
    out, lse = _finish(m, l, acc)
    o_ref[...] = out.astype(o_ref.dtype)
    if lse_ref:
        lse_ref[0][...] = lse[:, 0]


def _triton_forward(q, k, v, tables: Tables, cfg: FlashConfig, with_lse: bool):
    batch, length, heads, dim = q.shape
    groups = heads // k.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk = length // bq, length // bk
    q_spec = pl.BlockSpec((None, bq, None, dim), lambda b, h, i: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, length, None, dim), lambda b, h, i: (b, 0, h // groups, 0))
    out_specs = [q_spec]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if with_lse:
        out_specs.append(pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, length), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_triton_forward_kernel, rule=cfg.rule, scale=cfg.scale, block_k=bk),
        grid=(batch, heads, nq),
        in_specs=[q_spec, kv_spec, kv_spec,
                  pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
                  pl.BlockSpec((None, length), lambda b, h, i: (b, 0)),
                  pl.BlockSpec((None, None, nk), lambda b, h, i: (b, i, 0)),
                  pl.BlockSpec((None, None), lambda b, h, i: (b, i))],
        out_specs=out_specs, out_shape=out_shape, interpret=cfg.interpret,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        name="segment_flash_fwd",
    )(q, k, v, tables.q_code, tables.k_code, tables.fwd_table, tables.fwd_count)
    return (outs[0], outs[1]) if with_lse else (outs[0], None)


def _triton_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_code_ref, k_code_ref,
                      table_ref, count_ref, dq_ref, *, rule, scale, block_k):
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_code = q_code_ref[...][:, None]

    def body(s, dq):
        start = pl.multiple_of((table_ref[s] // 2) * block_k, block_k)
        keys = pl.ds(start, block_k)
        k = k_ref[keys, :]
        scores = _dot(q, k, _NT) * scale
        scores = jnp.where(tile_mask(rule, q_code, k_code_ref[keys][None, :]), scores, -jnp.inf)
        p = jnp.exp(scores - lse)
        ds = p * (_dot(do, v_ref[keys, :], _NT) - delta)
        return dq + _dot(ds.astype(k.dtype), k, _NN)

    dq = lax.fori_loop(0, count_ref[...], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _triton_dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_code_ref, k_code_ref,
                       table_ref, count_ref, dk_ref, dv_ref, *, rule, scale, block_q, groups):
    k, v = k_ref[...], v_ref[...]
    k_code = k_code_ref[...][:, None]
    count = count_ref[...]
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for g in range(groups):  # the query heads that share this KV head
        def body(s, carry, g=g):
            dk, dv = carry
            start = pl.multiple_of((table_ref[s] // 2) * block_q, block_q)
            rows = pl.ds(start, block_q)
            q, do = q_ref[rows, g, :], do_ref[rows, g, :]
            scores_t = _dot(k, q, _NT) * scale  # [bk, bq]
            scores_t = jnp.where(tile_mask(rule, q_code_ref[rows][None, :], k_code), scores_t, -jnp.inf)
            p_t = jnp.exp(scores_t - lse_ref[g, rows][None, :])
            dv = dv + _dot(p_t.astype(do.dtype), do, _NN)
            ds_t = p_t * (_dot(v, do, _NT) - delta_ref[g, rows][None, :])
            return dk + _dot(ds_t.astype(q.dtype), q, _NN), dv

        dk, dv = lax.fori_loop(0, count, body, (dk, dv))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _triton_backward(q, k, v, do, lse, delta, tables: Tables, cfg: FlashConfig):
    """dq, dk, dv; lse and delta are [B, H, Tp] (f32)."""
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk = length // bq, length // bk
    params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    q_spec = pl.BlockSpec((None, bq, None, dim), lambda b, h, i: (b, i, h, 0))
    kv_full = pl.BlockSpec((None, length, None, dim), lambda b, h, i: (b, 0, h // groups, 0))
    vec_spec = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_triton_dq_kernel, rule=cfg.rule, scale=cfg.scale, block_k=bk),
        grid=(batch, heads, nq),
        in_specs=[q_spec, kv_full, kv_full, q_spec, vec_spec, vec_spec,
                  pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
                  pl.BlockSpec((None, length), lambda b, h, i: (b, 0)),
                  pl.BlockSpec((None, None, nk), lambda b, h, i: (b, i, 0)),
                  pl.BlockSpec((None, None), lambda b, h, i: (b, i))],
        out_specs=q_spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=cfg.interpret, compiler_params=params, name="segment_flash_dq",
    )(q, k, v, do, lse, delta, tables.q_code, tables.k_code, tables.fwd_table, tables.fwd_count)

    group_q = pl.BlockSpec((None, length, groups, dim), lambda b, hk, j: (b, 0, hk, 0))
    kv_tile = pl.BlockSpec((None, bk, None, dim), lambda b, hk, j: (b, j, hk, 0))
    group_vec = pl.BlockSpec((None, groups, length), lambda b, hk, j: (b, hk, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_triton_dkv_kernel, rule=cfg.rule, scale=cfg.scale, block_q=bq, groups=groups),
        grid=(batch, kv_heads, nk),
        in_specs=[group_q, kv_tile, kv_tile, group_q, group_vec, group_vec,
                  pl.BlockSpec((None, length), lambda b, hk, j: (b, 0)),
                  pl.BlockSpec((None, bk), lambda b, hk, j: (b, j)),
                  pl.BlockSpec((None, None, nq), lambda b, hk, j: (b, j, 0)),
                  pl.BlockSpec((None, None), lambda b, hk, j: (b, j))],
        out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=cfg.interpret, compiler_params=params, name="segment_flash_dkv",
    )(q, k, v, do, lse, delta, tables.q_code, tables.k_code, tables.bwd_table, tables.bwd_count)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# custom_vjp over padded inputs in the model's layout [B, Tp, heads, D]
# ----------------------------------------------------------------------------------------------


def _forward(q, k, v, tables: Tables, cfg: FlashConfig, with_lse: bool):
    if cfg.backend == "tpu":
        out, lse = _tpu_forward(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                tables, cfg, with_lse)
        # lse [B, H, 1, Tp] -> [B, H, Tp]: the same residual as the Triton variant's
        return out.transpose(0, 2, 1, 3), (None if lse is None else lse[:, :, 0, :])
    return _triton_forward(q, k, v, tables, cfg, with_lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, tables: Tables, cfg: FlashConfig):
    return _forward(q, k, v, tables, cfg, with_lse=False)[0]


def _flash_fwd(q, k, v, tables: Tables, cfg: FlashConfig):
    out, lse = _forward(q, k, v, tables, cfg, with_lse=True)
    return out, (q, k, v, out, lse, tables)


def _flash_bwd(cfg: FlashConfig, residuals, d_out):
    q, k, v, out, lse, tables = residuals
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)  # [B, Tp, H]
    if cfg.backend == "tpu":
        t = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
        dq, dk, dv = _tpu_backward(t(q), t(k), t(v), t(d_out), lse[:, :, None, :],
                                   delta.transpose(0, 2, 1)[:, :, None, :], tables, cfg)
        dq, dk, dv = t(dq), t(dk), t(dv)
    else:
        dq, dk, dv = _triton_backward(q, k, v, d_out, lse, delta.transpose(0, 2, 1), tables, cfg)
    return dq, dk, dv, None  # the tables are integer inputs: no cotangent


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, rule: MaskRule, segments: Segments, *,
                    backend: str = "tpu", interpret: bool = False, block_q: int | None = None,
                    block_k: int | None = None, scale: float | None = None) -> jax.Array:
    """Self-attention of q [B, T, H, D] over k, v [B, T, Hkv, D] under `rule` and `segments`.

    Differentiable (flash backward kernels through `custom_vjp`). Rows that see no key return 0:
    the self-attention fallback is the caller's (see `dispatch.segment_attention`).
    `backend` "tpu" (Mosaic) or "triton" (GPU); `interpret=True` runs either on any backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    batch, length, heads, dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, length) or k.shape[3] != dim:
        raise ValueError(f"k {k.shape} and v {v.shape} must be [B={batch}, T={length}, Hkv, D={dim}]")
    if heads % k.shape[2]:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({k.shape[2]})")
    if segments.shape != (batch, length):
        raise ValueError(f"segments shape {segments.shape} must be [B, T] = {(batch, length)}")
    default_q, default_k = default_blocks(length, backend)
    block_q, block_k = block_q or default_q, block_k or default_k
    padded = _round_up(length, math.lcm(block_q, block_k))
    _check_blocks(backend, interpret, block_q, block_k, padded)
    cfg = FlashConfig(rule=rule, backend=backend, interpret=interpret, block_q=block_q, block_k=block_k,
                      scale=float(dim ** -0.5 if scale is None else scale))
    tables = build_tables(rule, segments, length, padded, block_q, block_k)
    if padded != length:
        pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    return _flash(q, k, v, tables, cfg)[:, :length]

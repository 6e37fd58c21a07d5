"""Entry points that `ops.attention` calls for impl="pallas": backend choice and sharding.

Backend: TPU runs the Mosaic kernels, GPU the Pallas Triton kernels, and any other platform (CPU)
runs the TPU kernels in interpret mode, so that the model and the sampler can be tested with
the kernels on a laptop. `backend=` / `interpret=` override the choice (tests run both variants).

Sharding: a Mosaic kernel cannot be partitioned by XLA. When the inputs live on a mesh of more
than one device (the context mesh of `jax.set_mesh`, or the mesh carried by the inputs' shardings
under `jit(in_shardings=...)`), the kernel runs under `shard_map`: the batch axis is split over
the mesh axes in BATCH_AXES and the heads over HEAD_AXES where they divide (the `batch` and
`heads` rules of `tradojax.parallel.axes`); other mesh axes see replicated work.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tradojax.ops import masks
from tradojax.ops.masks import MaskRule, Segments
from tradojax.ops.pallas import decode as decode_kernels
from tradojax.ops.pallas import segment as segment_kernels
from tradojax.parallel.axes import BATCH_AXES, HEAD_AXES


# lowering platform -> (kernel variant, interpret); any other platform interprets the TPU kernels
PLATFORM_KERNELS = {"tpu": ("tpu", False), "cuda": ("triton", False), "rocm": ("triton", False)}
_OTHER_PLATFORMS = ("tpu", True)


def kernel_backend(platform: str | None = None) -> tuple[str, bool]:
    """(kernel variant, interpret) for a platform name (default: `jax.default_backend()`)."""
    platform = platform or jax.default_backend()
    return PLATFORM_KERNELS.get("cuda" if platform == "gpu" else platform, _OTHER_PLATFORMS)


def _per_platform(make: Callable[[str, bool], Callable], backend: str | None, interpret: bool | None,
                  *args):
    """Runs make(variant, interpret)(*args). Without an explicit `backend`, the variant follows the
    platform the computation is *lowered* for (`lax.platform_dependent`), not the host's default
    backend: a jit compiled for TPU devices from a CPU host (AOT) gets the Mosaic kernels."""
    if backend is not None:
        native = kernel_backend() == (backend, False)
        return make(backend, (not native) if interpret is None else interpret)(*args)
    if interpret:
        return make(_OTHER_PLATFORMS[0], True)(*args)
    branches = {platform: make(*choice) for platform, choice in PLATFORM_KERNELS.items()}
    return jax.lax.platform_dependent(*args, default=make(*_OTHER_PLATFORMS), **branches)


def _mesh_of(arrays: Sequence[jax.Array]):
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh
    for array in arrays:
        candidate = getattr(getattr(jax.typeof(array), "sharding", None), "mesh", None)
        if candidate is not None and not candidate.empty:
            return candidate
    return None


def _split_axes(mesh, names: Sequence[str], sizes: Sequence[int]):
    """The mesh axes among `names` (in order) whose product divides every one of `sizes`."""
    chosen: list[str] = []
    for name in names:
        if name in mesh.axis_names and mesh.shape[name] > 1:
            product = math.prod(mesh.shape[a] for a in chosen) * mesh.shape[name]
            if all(size % product == 0 for size in sizes):
                chosen.append(name)
    if not chosen:
        return None
    return chosen[0] if len(chosen) == 1 else tuple(chosen)


def _sharded(fn: Callable, arrays: Sequence, batch: int, head_sizes: Sequence[int], layouts: Sequence[str],
             out_layout: str):
    """Runs fn(*arrays) under shard_map when a multi-device mesh is in play.

    A layout letter per dimension: 'b' batch, 'h' heads, '.' replicated.
    """
    leaves = jax.tree.leaves(arrays)
    mesh = _mesh_of(leaves)
    if mesh is None or mesh.size == 1:
        return fn(*arrays)
    batch_axes = _split_axes(mesh, BATCH_AXES, [batch])
    head_axes = _split_axes(mesh, HEAD_AXES, head_sizes)

    def spec(layout: str) -> P:
        return P(*[batch_axes if c == "b" else head_axes if c == "h" else None for c in layout])

    in_specs = tuple(jax.tree.map(lambda _: spec(layout), array) for array, layout in zip(arrays, layouts))
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=spec(out_layout), check_vma=False)(*arrays)


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, rule: MaskRule, segments: Segments, *,
                      backend: str | None = None, interpret: bool | None = None,
                      block_q: int | None = None, block_k: int | None = None) -> jax.Array:
    """Kernel version of `ops.attention.segment_attention` (same inputs, same result).

    q [B, T, H, D], k/v [B, T, Hkv, D]; differentiable. Rows that see no key attend to themselves
    (`masks.self_only`), as the dense reference does.
    """
    batch, heads, kv_heads = q.shape[0], q.shape[2], k.shape[2]

    def make(variant: str, interpret: bool):
        return lambda q, k, v, segments: segment_kernels.flash_attention(
            q, k, v, rule, segments, backend=variant, interpret=interpret, block_q=block_q, block_k=block_k)

    def local(q, k, v, segments):
        return _per_platform(make, backend, interpret, q, k, v, segments)

    out = _sharded(local, (q, k, v, segments), batch, (heads, kv_heads), ("b.h.", "b.h.", "b.h.", "b."), "b.h.")
    fallback = masks.self_only(rule, segments)
    own_value = jnp.repeat(v, heads // kv_heads, axis=2).astype(out.dtype)
    return jnp.where(fallback[:, :, None, None], own_value, out)


def cached_block_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cache_length: jax.Array,
                           k_block: jax.Array, v_block: jax.Array, *, backend: str | None = None,
                           interpret: bool | None = None, block_k: int | None = None) -> jax.Array:
    """Kernel version of `ops.attention.cached_block_attention` (same inputs, same result).

    q, k_block, v_block: [B, b, *, D]; k_cache, v_cache: [B, S, Hkv, D]; cache_length: [B].
    """
    batch, heads, kv_heads = q.shape[0], q.shape[2], k_cache.shape[2]

    def make(variant: str, interpret: bool):
        return lambda *args: decode_kernels.decode_attention(*args, backend=variant, interpret=interpret,
                                                             block_k=block_k)

    def local(*args):
        return _per_platform(make, backend, interpret, *args)

    return _sharded(local, (q, k_cache, v_cache, cache_length, k_block, v_block), batch, (heads, kv_heads),
                    ("b.h.", "b.h.", "b.h.", "b", "b.h.", "b.h."), "b.h.")


# Query rows (block columns x query heads per KV head) per decode-kernel call of
# `visible_keys_attention`: a TPU call keeps its [rows, D] accumulator per KV head in VMEM, a Triton
# program holds its rows in registers.
_SPAN_ROWS = {"tpu": 1024, "triton": 128}


def pack_visible_keys(key_visible: jax.Array, own_start: jax.Array, own: int) -> tuple[jax.Array, jax.Array]:
    """(order [B, T], lengths [B]): per row, the visible columns outside [own_start, own_start + own)
    first, in column order (`order` indexes them), and how many there are."""
    columns = jnp.arange(key_visible.shape[1])
    own_columns = (columns >= own_start) & (columns < own_start + own)
    rest = key_visible & ~own_columns[None, :]
    order = jnp.argsort(~rest, axis=1, stable=True)
    return order.astype(jnp.int32), rest.sum(axis=1).astype(jnp.int32)


def visible_keys_attention(q: jax.Array, keys: jax.Array, values: jax.Array, packing: tuple[jax.Array, jax.Array],
                           own_keys: jax.Array, own_values: jax.Array, *, backend: str | None = None,
                           interpret: bool | None = None, block_k: int | None = None) -> jax.Array:
    """The cached full-attention forward's attention on the decode kernel: queries q [B, W, H, D]
    see the `own` keys ([B, own, Hkv, D]: the block, always visible) and the columns of keys /
    values [B, T, Hkv, D] that `packing` (`pack_visible_keys`) lists; same result as
    `ops.attention.masked_attention` over the columns in canvas order with that visibility.

    The listed columns are gathered to the front of a per-row cache whose length is their count
    (one copy of the keys per call, as the reference's span update makes), so the kernel reads
    only live tiles; the queries go through the kernel in chunks of at most `_SPAN_ROWS` rows.
    """
    order, lengths = packing
    k_cache = jnp.take_along_axis(keys, order[:, :, None, None], axis=1)
    v_cache = jnp.take_along_axis(values, order[:, :, None, None], axis=1)
    batch, width, heads, _ = q.shape
    kv_heads = keys.shape[2]

    def make(variant: str, interpret: bool):
        columns = max(1, _SPAN_ROWS[variant] // (heads // kv_heads))

        def run(q, k_cache, v_cache, lengths, own_keys, own_values):
            return jnp.concatenate([
                decode_kernels.decode_attention(q[:, s:s + columns], k_cache, v_cache, lengths, own_keys, own_values,
                                                backend=variant, interpret=interpret, block_k=block_k)
                for s in range(0, width, columns)], axis=1)

        return run

    def local(*args):
        return _per_platform(make, backend, interpret, *args)

    return _sharded(local, (q, k_cache, v_cache, lengths, own_keys, own_values), batch, (heads, kv_heads),
                    ("b.h.", "b.h.", "b.h.", "b", "b.h.", "b.h."), "b.h.")

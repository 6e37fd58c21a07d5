"""One decoder for SDAR/TraDo (Qwen3 backbone), LLaDA and Dream, selected by config switches.

The layer parameters are stacked on a leading `layers` axis (checkpoints, HF import/export, sharding
rules and AOT all see that layout) and the network runs as one `lax.scan` over them: compile time
does not grow with depth, and remat wraps one layer. XLA:CPU materialises every weight matrix the
scan slices out (a dynamic-slice copy of the whole model per forward), so for decoding on CPU
`per_layer_view(params)` re-presents the same weights as one array per layer (each `layers.*` leaf
becomes a tuple); the model then runs an unrolled Python loop whose matmuls read every weight in
place. Both layouts give bit-identical results.
Parameter names follow the Hugging Face checkpoints (`embed_tokens`, `layers.q_proj`, ...), so the
key table in `models/hf.py` is a short list of renames and transposes.

At the jit boundary the model is used functionally: `graphdef, params = nnx.split(model)`, then
`nnx.merge(graphdef, params)` inside the jitted function (see `apply`).

Attention takes a mask *rule* and per-token `Segments` (ops/masks.py), never a dense mask. The
KV cache (`KVCache`) supports the three calls the sampler needs: `prefill` (write the prompt's K/V),
`decode_block(commit=False)` (attend to the cache + the current block without writing) and
`decode_block(commit=True)` (the same forward, writing the block's K/V).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tradojax.config import ModelConfig
from tradojax.ops import attention as attention_ops
from tradojax.ops.masks import MaskRule, Segments, inference_segments

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# The parameters' logical axes (mapped onto mesh axes per role): parallel/axes.PARAM_LOGICAL_AXES.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Contiguous per-sequence cache: sequence i's tokens sit at slots [0, length[i]).

    Slot s holds the token at position s of that sequence, so blocks are aligned to each
    sequence's own prompt start whatever the other sequences' lengths.
    """

    k: jax.Array  # [layers, B, S, Hkv, D]
    v: jax.Array  # [layers, B, S, Hkv, D]
    length: jax.Array  # [B] int32: committed tokens

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, slots: int, dtype=None) -> KVCache:
        dtype = dtype or DTYPES[config.compute_dtype]
        shape = (config.num_layers, batch, slots, config.num_kv_heads, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @property
    def slots(self) -> int:
        return self.k.shape[2]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) * w, computed in float32 (as the original's fused kernel)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """NeoX (rotate-half) RoPE over the whole head dim; x [B, T, H, D], positions [B, T]."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    first, second = x32[..., : dim // 2], x32[..., dim // 2:]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


class Layers(nnx.Module):
    """All decoder layers' parameters, stacked on axis 0."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        n, d, f, hd = c.num_layers, c.hidden_size, c.intermediate_size, c.head_dim
        dtype = DTYPES[c.param_dtype]
        init = nnx.initializers.normal(c.initializer_range)

        def param(*shape):
            return nnx.Param(init(rngs.params(), shape, dtype))

        def ones(*shape):
            return nnx.Param(jnp.ones(shape, dtype))

        self.input_layernorm = ones(n, d)
        self.post_attention_layernorm = ones(n, d)
        self.q_proj = param(n, d, c.num_heads, hd)
        self.k_proj = param(n, d, c.num_kv_heads, hd)
        self.v_proj = param(n, d, c.num_kv_heads, hd)
        self.o_proj = param(n, c.num_heads, hd, d)
        if c.qkv_bias:
            self.q_bias = nnx.Param(jnp.zeros((n, c.num_heads, hd), dtype))
            self.k_bias = nnx.Param(jnp.zeros((n, c.num_kv_heads, hd), dtype))
            self.v_bias = nnx.Param(jnp.zeros((n, c.num_kv_heads, hd), dtype))
        if c.qk_norm:
            self.q_norm = ones(n, hd)
            self.k_norm = ones(n, hd)
        self.gate_proj = param(n, d, f)
        self.up_proj = param(n, d, f)
        self.down_proj = param(n, f, d)


class Decoder(nnx.Module):
    """The decoder: embeddings, stacked layers, final norm and LM head."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = DTYPES[config.param_dtype]
        init = nnx.initializers.normal(config.initializer_range)
        self.embed_tokens = nnx.Param(init(rngs.params(), (config.vocab_size, config.hidden_size), dtype))
        self.layers = Layers(config, rngs)
        self.norm = nnx.Param(jnp.ones((config.hidden_size,), dtype))
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Param(init(rngs.params(), (config.hidden_size, config.vocab_size), dtype))

    # ------------------------------------------------------------------ pieces

    def layer_params(self) -> dict[str, jax.Array | tuple[jax.Array, ...]]:
        """Every layer weight in the compute dtype: stacked arrays, or tuples of per-layer arrays
        (`per_layer_view`)."""
        compute = DTYPES[self.config.compute_dtype]
        params = {}
        for name, variable in vars(self.layers).items():
            if isinstance(variable, nnx.Param):
                value = variable.get_value()
                params[name] = (tuple(w.astype(compute) for w in value) if isinstance(value, tuple)
                                else value.astype(compute))
        return params

    def embed(self, tokens: jax.Array) -> jax.Array:
        compute = DTYPES[self.config.compute_dtype]
        return jnp.take(self.embed_tokens[...], tokens, axis=0).astype(compute)

    def hidden_to_logits(self, hidden: jax.Array) -> jax.Array:
        """Final norm + LM head; logits in float32."""
        c = self.config
        compute = DTYPES[c.compute_dtype]
        hidden = rms_norm(hidden, self.norm[...], c.rms_norm_eps)
        head = self.embed_tokens[...].T if c.tie_word_embeddings else self.lm_head[...]
        return jnp.einsum("btd,dv->btv", hidden, head.astype(compute), preferred_element_type=jnp.float32)

    def qkv(self, p: dict, x: jax.Array, positions: jax.Array):
        c = self.config
        h = rms_norm(x, p["input_layernorm"], c.rms_norm_eps)
        q = jnp.einsum("btd,dhk->bthk", h, p["q_proj"])
        k = jnp.einsum("btd,dhk->bthk", h, p["k_proj"])
        v = jnp.einsum("btd,dhk->bthk", h, p["v_proj"])
        if c.qkv_bias:
            q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
        if c.qk_norm:
            q = rms_norm(q, p["q_norm"], c.rms_norm_eps)
            k = rms_norm(k, p["k_norm"], c.rms_norm_eps)
        return rotary(q, positions, c.rope_theta), rotary(k, positions, c.rope_theta), v

    def finish_layer(self, p: dict, x: jax.Array, attn: jax.Array) -> jax.Array:
        c = self.config
        x = x + jnp.einsum("bthk,hkd->btd", attn, p["o_proj"])
        h = rms_norm(x, p["post_attention_layernorm"], c.rms_norm_eps)
        gated = jax.nn.silu(jnp.einsum("btd,df->btf", h, p["gate_proj"])) * jnp.einsum("btd,df->btf", h, p["up_proj"])
        return x + jnp.einsum("btf,fd->btd", gated, p["down_proj"])

    def layer_loop(self, body, x: jax.Array, layer_params: dict, *per_layer: Any):
        """x, ys = body(x, (params of layer i, per_layer[..][i])) for every layer, ys stacked on axis 0.

        Stacked weights run as a `lax.scan`; per-layer weights (`per_layer_view`) as an unrolled
        loop that hands each matmul its own weight array (no slice, so no copy on CPU).
        """
        if self.config.remat == "full":
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        elif self.config.remat == "dots":
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
        if not isinstance(next(iter(layer_params.values())), tuple):
            return jax.lax.scan(body, x, (layer_params, *per_layer))
        outputs = []
        for i in range(self.config.num_layers):
            x, out = body(x, ({name: w[i] for name, w in layer_params.items()}, *(a[i] for a in per_layer)))
            outputs.append(out)
        return x, jax.tree.map(lambda *ys: jnp.stack(ys), *outputs)

    # ------------------------------------------------------------------ calls

    def hidden_states(self, tokens: jax.Array, positions: jax.Array, segments: Segments,
                      rule: MaskRule = MaskRule.BLOCK_DIFFUSION, *, return_kv: bool = False):
        """Full (uncached) forward to the last hidden states [B, T, hidden].

        With `return_kv`, also returns every layer's K/V ([layers, B, T, Hkv, D] each).
        """
        impl = self.config.attention_impl

        def body(x, layer):
            (p,) = layer
            q, k, v = self.qkv(p, x, positions)
            attn = attention_ops.segment_attention(q, k, v, rule, segments, impl=impl)
            return self.finish_layer(p, x, attn), ((k, v) if return_kv else None)

        x, kv = self.layer_loop(body, self.embed(tokens), self.layer_params())
        return (x, kv) if return_kv else x

    def __call__(self, tokens: jax.Array, positions: jax.Array, segments: Segments,
                 rule: MaskRule = MaskRule.BLOCK_DIFFUSION) -> jax.Array:
        """Logits [B, T, vocab] (float32) of a full forward under `rule`."""
        return self.hidden_to_logits(self.hidden_states(tokens, positions, segments, rule))

    def prefill(self, tokens: jax.Array, lengths: jax.Array, cache: KVCache, block_size: int):
        """Writes the K/V of each sequence's first `lengths[i]` tokens into slots [0, lengths[i]).

        `tokens` [B, T] are right-padded (sequence i's token t at column t, position t); the
        block-causal rule with blocks of `block_size` from position 0. Returns the cache with
        `length = lengths`; no logits are computed (the prefill's logits are never used).
        """
        batch, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        valid = positions < lengths[:, None]
        segments = inference_segments(positions, valid, block_size)
        _, (k, v) = self.hidden_states(tokens, positions, segments, MaskRule.BLOCK_DIFFUSION, return_kv=True)
        keep = valid[None, :, :, None, None]
        k = jnp.where(keep, k, 0).astype(cache.k.dtype)
        v = jnp.where(keep, v, 0).astype(cache.v.dtype)
        new_k = jax.lax.dynamic_update_slice_in_dim(cache.k, k, 0, axis=2)
        new_v = jax.lax.dynamic_update_slice_in_dim(cache.v, v, 0, axis=2)
        return KVCache(new_k, new_v, lengths.astype(jnp.int32))

    def _layer_caches(self, layer_params: dict, cache: KVCache):
        """What the decode's layer loop hands each layer as (k, v, layer index): the scan slices
        the stacked caches (index None); the unrolled loop over per-layer weights (`per_layer_view`)
        passes every layer's cache and a static index, so that the attention slices its layer inside
        its live-prefix branch (a slice taken before the branch is copied whole on CPU; remat, which
        takes arrays only, keeps the slices)."""
        if not isinstance(next(iter(layer_params.values())), tuple):
            return (cache.k, cache.v, None)
        if self.config.remat == "none":
            return tuple((cache.k, cache.v, i) for i in range(self.config.num_layers))
        return tuple((cache.k[i], cache.v[i], None) for i in range(self.config.num_layers))

    def decode_block(self, block_tokens: jax.Array, cache: KVCache, *, commit: bool,
                     logits: bool = True):
        """One forward of the current block [B, b] at positions cache.length + arange(b).

        Queries see the committed cache and the whole block (bidirectional inside it). Returns
        (logits [B, b, vocab] or None, cache): the cache is unchanged unless `commit`, in which case
        the block's K/V are written at slots [length, length + b) and length advances by b.
        """
        c = self.config
        batch, block = block_tokens.shape
        positions = cache.length[:, None] + jnp.arange(block, dtype=jnp.int32)[None, :]

        def body(x, layer):
            p, (k_cache, v_cache, index) = layer
            q, k, v = self.qkv(p, x, positions)
            attn = attention_ops.cached_block_attention(
                q, k_cache, v_cache, cache.length, k, v, impl=c.attention_impl, layer=index)
            return self.finish_layer(p, x, attn), ((k, v) if commit else None)

        layer_params = self.layer_params()
        hidden, new_kv = self.layer_loop(body, self.embed(block_tokens), layer_params,
                                         self._layer_caches(layer_params, cache))
        out_logits = self.hidden_to_logits(hidden) if logits else None
        if not commit:
            return out_logits, cache
        k_block, v_block = new_kv  # [layers, B, b, Hkv, D]

        def write(cache_rows, block_rows, start):  # one sequence: [layers, S, ...] <- [layers, b, ...]
            return jax.lax.dynamic_update_slice_in_dim(cache_rows, block_rows, start, axis=1)

        write_batch = jax.vmap(write, in_axes=(1, 1, 0), out_axes=1)
        new_k = write_batch(cache.k, k_block.astype(cache.k.dtype), cache.length)
        new_v = write_batch(cache.v, v_block.astype(cache.v.dtype), cache.length)
        return out_logits, KVCache(new_k, new_v, cache.length + block)

    def decode_block_after_save(self, saved_tokens: jax.Array, save: jax.Array, block_tokens: jax.Array,
                                cache: KVCache):
        """The save pass fused into the next block's denoising forward: one forward of 2b tokens.

        Rows with `save` [B]: the decided block `saved_tokens` [B, b] (positions length + arange(b))
        sees the committed cache and itself, so its K/V are exactly those `decode_block(commit=True)`
        writes, and are written at slots [length, length + b); the current block (positions
        length + b + arange(b)) sees the cache, the decided block and itself (block-causal: the
        decided block never sees it), so its logits are those of `decode_block` after the save.
        Rows without `save` put their current block first: its queries see the cache and itself,
        so its logits are `decode_block`'s; the second half is computed and dropped, and the
        block's K/V land beyond the committed length, where nothing reads them. One attention call
        per half reads the cache (no copy of it). Returns (logits of each row's current block
        [B, b, vocab], cache with length + b * save).
        """
        logits, k_first, v_first = self.fused_save_forward(saved_tokens, save, block_tokens, cache)
        write_batch = jax.vmap(lambda rows, new, start: jax.lax.dynamic_update_slice_in_dim(rows, new, start, axis=1),
                               in_axes=(1, 1, 0), out_axes=1)
        new_k = write_batch(cache.k, k_first.astype(cache.k.dtype), cache.length)
        new_v = write_batch(cache.v, v_first.astype(cache.v.dtype), cache.length)
        length = cache.length + jnp.where(save, saved_tokens.shape[1], 0).astype(jnp.int32)
        return logits, KVCache(new_k, new_v, length)

    def fused_save_forward(self, saved_tokens: jax.Array, save: jax.Array, block_tokens: jax.Array,
                           cache: KVCache) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`decode_block_after_save` without the cache write: (logits [B, b, vocab], and the K/V of
        each row's first b tokens [layers, B, b, Hkv, D] for slots [length, length + b)), so that a
        caller branching between this and `decode_block` writes the cache outside the branch."""
        c = self.config
        block = block_tokens.shape[1]
        first = jnp.where(save[:, None], saved_tokens, block_tokens)
        positions = cache.length[:, None] + jnp.arange(2 * block, dtype=jnp.int32)[None, :]

        def body(x, layer):
            p, (k_cache, v_cache, index) = layer
            q, k, v = self.qkv(p, x, positions)
            first_attn = attention_ops.cached_block_attention(
                q[:, :block], k_cache, v_cache, cache.length, k[:, :block], v[:, :block], impl=c.attention_impl,
                layer=index)
            second_attn = attention_ops.cached_block_attention(
                q[:, block:], k_cache, v_cache, cache.length, k, v, impl=c.attention_impl, layer=index)
            attn = jnp.concatenate([first_attn, second_attn], axis=1)
            return self.finish_layer(p, x, attn), (k[:, :block], v[:, :block])

        tokens = jnp.concatenate([first, block_tokens], axis=1)
        layer_params = self.layer_params()
        hidden, (k_first, v_first) = self.layer_loop(body, self.embed(tokens), layer_params,
                                                     self._layer_caches(layer_params, cache))
        hidden = jnp.where(save[:, None, None], hidden[:, block:], hidden[:, :block])
        return self.hidden_to_logits(hidden), k_first, v_first


def init_model(config: ModelConfig, seed: int = 0) -> Decoder:
    return Decoder(config, rngs=nnx.Rngs(params=seed))


def abstract_model(config: ModelConfig) -> Decoder:
    """The model with ShapeDtypeStruct leaves: no memory allocated (for AOT and loading)."""
    return nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(params=0)))


def per_layer_view(params: nnx.State) -> nnx.State:
    """The same weights with every stacked `layers.*` array split into a tuple of per-layer arrays.

    For a caller that runs many forwards with the same weights on CPU (the sampler): the split is
    one copy of the layer weights, made once, instead of a copy per forward inside the scan. The
    model accepts either layout and computes the same values; checkpoints and sharding rules only
    ever see the stacked one. Idempotent.
    """
    def split(path, variable):
        value = variable.get_value()
        if str(path[0]) != "layers" or isinstance(value, tuple):
            return variable
        return variable.replace(tuple(value[i] for i in range(value.shape[0])))

    return nnx.map_state(split, params)


def param_paths(params: nnx.State) -> dict[str, Any]:
    """Flat {"layers.q_proj": leaf, ...} view of a params state."""
    flat = {}
    for path, leaf in nnx.to_flat_state(params):
        flat[".".join(str(p) for p in path)] = leaf
    return flat


@functools.partial(jax.jit, static_argnames=("graphdef", "rule"))
def apply(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, positions: jax.Array,
          segments: Segments, rule: MaskRule = MaskRule.BLOCK_DIFFUSION) -> jax.Array:
    """Jitted pure forward: logits of `nnx.merge(graphdef, params)`."""
    return nnx.merge(graphdef, params)(tokens, positions, segments, rule)

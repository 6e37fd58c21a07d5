"""The full-attention diffusion sampler for LLaDA and Dream (spec sections 2.6 and 2.7).

Canvas: the left-padded prompts followed by `gen_length` masks, decoded in semi-autoregressive
blocks of `block_length` from left to right; the `steps` are split over the blocks with the
remainder going to the first ones. A block is denoised until it holds no mask; then a row whose
block is all EOS/pad is finished (the rest of its canvas becomes pad) and the next block starts.

Per step, on the block's positions only:
  * LLaDA (`model.family == "llada"`): Gumbel-max sampling at `temperature` (0 = argmax); the
    score (`target`) comes from the untempered softmax: `confidence` p(x0), `margin_confidence`
    top1 - top2, `neg_entropy` sum p log p, or `random` (uniform). Static remasking commits the
    top-k_t masked positions (k_t from the block's transfer schedule); dynamic commits every masked
    position scoring `>= threshold`, else the best one.
  * Dream (`"dream"`): the logits are shifted right by one (the logit at column j-1 scores column
    j). Proposals are drawn from the tempered, top-p- then top-k-filtered distribution (temperature
    0 = argmax), and the score is computed on that distribution (`neg_entropy` = sum p log(p+1e-10)).
    A pad proposal's score is divided by `pad_target_penalty`. Step 0 of every block commits the
    block's first token unconditionally. Static remasking commits int(n_mask * (1 - s/t)) tokens
    (all at the block's last step) with timesteps linspace(1, eps, steps_per_block + 1), by top-k,
    or, with `alg_temp > 0`, positions drawn without replacement from softmax(score / alg_temp);
    dynamic is as for LLaDA.

Caches (`cache`):
  * `none`: the reference, a full forward of the canvas at every step;
  * `prefix` (Fast-dLLM): a full forward at the block's first step keeps every column's K/V; later
    steps forward only the block and what follows it (or the window of `further_horizon` columns
    after the block) against the cached prefix;
  * `dual`: later steps forward only the block, against the cached prefix *and* suffix.
  `refresh_every = n > 0` also refreshes the cache every n steps inside a block. The cached forward
  is exact given fresh caches (only staleness approximates): with `refresh_every=1` and
  `cached_logits_on_refresh=True` (every step's logits through the cached path) the prefix (no
  horizon) and dual caches reproduce the uncached tokens (tests).

Deliberate differences from the original, each a fix or needed for rows to be independent:
  * left pads are invisible keys and positions count from each row's first prompt token (the
    original LLaDA attends to pads, the Dream rollout already masks them, spec 1.4/1.5), so a row
    decodes the same in any batch;
  * Dream's static count uses the row's own mask count (the original averages over the batch);
  * LLaDA's `neg_entropy` ranks by sum p log p, i.e. most certain first: the original computes
    +entropy and picks the most uncertain first (spec 10.13), fixed knowingly;
  * the mask token is never proposed (its logit is -inf), as in the block-diffusion sampler, and
    only still-masked positions of the block can be committed (spec 10.11); ties in a score go to
    the lowest position;
  * for Dream the cached query span starts one column before the block, so every block position
    gets the logit of the column before it, as in the full forward (the original's window forward
    gives the block's first column its own logit; that column is already committed then).

Trace: for each generated token, the row's 1-based denoising step (forwards the row took part in
while it still had masks) at which it was unmasked; the log-prob is the token's under the
distribution it was drawn from (0 for greedy). Randomness: row r draws from
`fold_in(fold_in(key(rng), row_ids[r]), step)`, so a row decodes the same in any batch.

Compiled as one jitted function per (shapes, settings): one `lax.while_loop` over (block, step).
Options come from the config's `sampling` section (`FullDiffusionConfig.from_sampling`). On a
mesh the rows are split over its data axes (the rollout's batch rule) and the K/V caches' kv_heads
over `tensor`; at most `max_active` rows per data replica are resident: the rows run in waves of
that many through the same compiled program (`FullDiffusionSampler`). With the Pallas attention
the cached span runs on the decode kernel (`span_hidden`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tradojax.config import ConfigError, SamplingConfig
from tradojax.models.transformer import Decoder, per_layer_view
from tradojax.ops import attention as attention_ops
from tradojax.ops.masks import MaskRule, full_segments
from tradojax.ops.pallas import dispatch
from tradojax.parallel.axes import BATCH_AXES
from tradojax.parallel.mesh import batch_sharding, data_parallel_size
from tradojax.parallel.sharding import shard_batch, shard_params, state_shardings, to_host
from tradojax.sampling import strategies
from tradojax.sampling.block_diffusion import BlockDiffusionSampler, Rollout, prompt_bucket, rollout_params

Target = Literal["confidence", "margin_confidence", "neg_entropy", "random"]
TARGETS: tuple[str, ...] = ("confidence", "margin_confidence", "neg_entropy", "random")
REMASKING: tuple[str, ...] = ("static", "dynamic")
CACHES: tuple[str, ...] = ("none", "prefix", "dual")
FAMILIES: tuple[str, ...] = ("llada", "dream")
DREAM_ENTROPY_EPS = 1e-10  # Dream's neg_entropy: sum p log(p + 1e-10)


def _fail(field: str, message: str):
    raise ConfigError(f"full_diffusion.{field}: {message}")


@dataclasses.dataclass(frozen=True)
class FullDiffusionConfig:
    """Settings of the full-attention sampler (defaults: the original rollouts' shape, greedy)."""

    gen_length: int = 64
    block_length: int = 32
    steps: int = 64  # denoising steps over the whole canvas (split over the blocks)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # Dream only
    top_k: int = 0  # Dream only; 0 = off
    target: Target = "confidence"
    remasking: Literal["static", "dynamic"] = "static"
    threshold: float = 0.9  # dynamic remasking: commit every score >= threshold
    alg_temp: float = 0.0  # Dream static: > 0 draws the committed positions from softmax(score / alg_temp)
    pad_target_penalty: float = 1.0  # Dream: pad proposals' scores are divided by this
    eps: float = 1e-3  # Dream's last timestep
    cache: Literal["none", "prefix", "dual"] = "prefix"
    further_horizon: int | None = None  # prefix cache: columns after the block forwarded (None = all)
    refresh_every: int = 0  # also refresh the cache every n steps inside a block (0 = once per block)
    cached_logits_on_refresh: bool = False  # take refresh steps' logits through the cached forward too
    num_samples: int = 1  # rows per prompt
    max_new_tokens: int | None = None  # responses cut to this many tokens (None: gen_length)
    stop_token_ids: tuple[int, ...] = ()  # besides EOS/pad: end a response (its length) but not the canvas
    max_active: int = 256  # rows resident at once per data-parallel replica (the rest wait for the next wave)
    prompt_buckets: tuple[int, ...] = ()  # prompt region widths to round up to (fewer compiles); () = the longest

    def __post_init__(self) -> None:
        if self.block_length < 1:
            _fail("block_length", f"must be >= 1, got {self.block_length}")
        if self.gen_length < 1 or self.gen_length % self.block_length:
            _fail("gen_length", f"must be a positive multiple of block_length={self.block_length}, "
                                f"got {self.gen_length}")
        if not self.num_blocks <= self.steps <= self.gen_length:
            _fail("steps", f"must be in [num_blocks={self.num_blocks}, gen_length={self.gen_length}] "
                           f"(1 to block_length steps per block), got {self.steps}")
        if self.temperature < 0:
            _fail("temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            _fail("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            _fail("top_k", f"must be >= 0, got {self.top_k}")
        if self.target not in TARGETS:
            _fail("target", f"must be one of {list(TARGETS)}, got {self.target!r}")
        if self.remasking not in REMASKING:
            _fail("remasking", f"must be one of {list(REMASKING)}, got {self.remasking!r}")
        if self.alg_temp < 0:
            _fail("alg_temp", f"must be >= 0, got {self.alg_temp}")
        if self.pad_target_penalty <= 0:
            _fail("pad_target_penalty", f"must be > 0, got {self.pad_target_penalty}")
        if not 0 < self.eps < 1:
            _fail("eps", f"must be in (0, 1), got {self.eps}")
        if self.cache not in CACHES:
            _fail("cache", f"must be one of {list(CACHES)}, got {self.cache!r}")
        if self.further_horizon is not None and self.further_horizon < 0:
            _fail("further_horizon", f"must be >= 0 or None, got {self.further_horizon}")
        if self.refresh_every < 0:
            _fail("refresh_every", f"must be >= 0, got {self.refresh_every}")
        if self.num_samples < 1:
            _fail("num_samples", f"must be >= 1, got {self.num_samples}")
        if self.max_new_tokens is not None and not 1 <= self.max_new_tokens <= self.gen_length:
            _fail("max_new_tokens", f"must be in [1, gen_length={self.gen_length}] or None, got {self.max_new_tokens}")
        if self.max_active < 1:
            _fail("max_active", f"must be >= 1, got {self.max_active}")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    def steps_per_block(self) -> tuple[int, ...]:
        """`steps // num_blocks` per block, one more for each of the first `steps % num_blocks`."""
        base, extra = divmod(self.steps, self.num_blocks)
        return tuple(base + (1 if k < extra else 0) for k in range(self.num_blocks))

    @classmethod
    def from_sampling(cls, sampling: SamplingConfig, family: str, **overrides) -> FullDiffusionConfig:
        """The config's `sampling` section as full-attention settings: a canvas of
        `sampling.full_gen_length` in blocks of `block_size`, `total_steps` over it (or
        `denoising_steps` per block); the two low-confidence strategies map to static/dynamic;
        greedy `top_k=1` is temperature 0; target, alg_temp, pad_target_penalty, cache_mode,
        further_horizon and max_active are taken as they are."""
        if sampling.remasking_strategy not in ("low_confidence_static", "low_confidence_dynamic"):
            raise ConfigError(f"sampling.remasking_strategy: the full-attention ({family}) sampler takes "
                              f"'low_confidence_static' or 'low_confidence_dynamic', got "
                              f"{sampling.remasking_strategy!r}")
        greedy = sampling.top_k == 1
        if family == "llada" and not greedy and (sampling.top_k > 1 or sampling.top_p < 1):
            raise ConfigError("sampling.top_k/top_p: LLaDA samples by Gumbel-max from the whole vocabulary; "
                              "use top_k=0 and top_p=1 (or top_k=1 for greedy)")
        b = sampling.block_size
        gen_length = sampling.full_gen_length
        settings = dict(
            gen_length=gen_length, block_length=b,
            steps=sampling.total_steps or gen_length // b * sampling.denoising_steps,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=sampling.top_p, top_k=0 if greedy else sampling.top_k,
            remasking="static" if sampling.remasking_strategy == "low_confidence_static" else "dynamic",
            threshold=sampling.dynamic_threshold, num_samples=sampling.num_samples,
            max_new_tokens=sampling.max_new_tokens,
            stop_token_ids=tuple(sampling.stop_token_ids), target=sampling.target, alg_temp=sampling.alg_temp,
            pad_target_penalty=sampling.pad_target_penalty, cache=sampling.cache_mode,
            further_horizon=sampling.further_horizon, max_active=sampling.max_active,
            prompt_buckets=tuple(sampling.prompt_buckets))
        settings.update(overrides)
        return cls(**settings)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static of one compiled generate (hashable)."""

    settings: FullDiffusionConfig
    family: str
    prompt_width: int  # P: canvas columns before the generated region
    mask_id: int
    eos_id: int
    pad_id: int
    key_impl: str = "threefry2x32"  # the row keys' PRNG (they arrive as key data)
    mesh: Mesh | None = None  # rows split over BATCH_AXES of it, the K/V caches' kv_heads over tensor
    kv_heads: int = 1

    @property
    def width(self) -> int:
        return self.prompt_width + self.settings.gen_length

    @property
    def shift(self) -> int:
        return 1 if self.family == "dream" else 0

    def constrain(self, x: jax.Array, row_axis: int = 0) -> jax.Array:
        """`x` with `row_axis` split over the mesh's data axes (the rollout's batch rule); a K/V
        cache ([layers, rows, columns, kv_heads, head_dim]) also with kv_heads over `tensor`."""
        if self.mesh is None:
            return x
        spec = [None] * x.ndim
        spec[row_axis] = tuple(a for a in BATCH_AXES if self.mesh.shape.get(a, 1) > 1) or None
        tensor = self.mesh.shape.get("tensor", 1)
        if x.ndim == 5 and tensor > 1 and self.kv_heads % tensor == 0:
            spec[3] = "tensor"
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, PartitionSpec(*spec)))


# ----------------------------------------------------------------------------------------------
# Per-step proposal and selection (pure functions of the block's logits)
# ----------------------------------------------------------------------------------------------


def step_keys(row_keys: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two keys per row for its `step` (1-based): (token draw, position draw)."""
    keys = jax.vmap(jax.random.fold_in)(row_keys, step)
    pair = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
    return pair[:, 0], pair[:, 1]


def _top_two_margin(probs: jax.Array) -> jax.Array:
    top2, _ = jax.lax.top_k(probs, 2)
    return top2[..., 0] - top2[..., 1]


def llada_proposal(logits: jax.Array, token_keys: jax.Array, position_keys: jax.Array, *,
                   temperature: float, target: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens, log-probs, scores), each [B, b], from logits [B, b, V] (mask logit already -inf).

    Gumbel-max: argmax(logits - T log(-log u)) is the original's argmax(exp(logits) / (-log u)^T)
    (a monotone transform, no float64 overflow), an exact draw from softmax(logits / T).
    """
    batch, block, vocab = logits.shape
    logits = logits.astype(jnp.float32)
    if temperature > 0:
        uniform = jax.vmap(lambda k: jax.random.uniform(k, (block, vocab), jnp.float32,
                                                        minval=jnp.finfo(jnp.float32).tiny, maxval=1.0))(token_keys)
        tokens = jnp.argmax(logits - temperature * jnp.log(-jnp.log(uniform)), axis=-1).astype(jnp.int32)
        tempered = jax.nn.log_softmax(logits / temperature, axis=-1)
        logprob = jnp.take_along_axis(tempered, tokens[..., None], axis=-1)[..., 0]
    else:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logprob = jnp.zeros(tokens.shape, jnp.float32)
    log_p = jax.nn.log_softmax(logits, axis=-1)  # the scores use the untempered distribution
    p = jnp.exp(log_p)
    if target == "confidence":
        score = jnp.take_along_axis(p, tokens[..., None], axis=-1)[..., 0]
    elif target == "margin_confidence":
        score = _top_two_margin(p)
    elif target == "neg_entropy":
        # sum p log p: the most certain positions first. The original computes -sum p log p here
        # and so ranks the most uncertain first (spec 2.6, 10.13): fixed on purpose.
        score = jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1)
    elif target == "random":
        score = jax.vmap(lambda k: jax.random.uniform(k, (block,), jnp.float32))(position_keys)
    else:
        raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
    return tokens, logprob, score


def dream_filtered(logits: jax.Array, *, temperature: float, top_p: float, top_k: int):
    """Dream's proposal distribution: (log-probs [..., C], candidate ids [..., C]) after temperature
    (skipped at 0), top-p, then top-k (Dream's order: the nucleus is taken on the whole vocabulary)."""
    scale = temperature if temperature > 0 else 1.0
    vocab = logits.shape[-1]
    if top_p < 1:
        log_probs, ids = strategies.filtered_log_probs(logits, scale, 0, top_p, True)  # sorted candidates
        if 0 < top_k < vocab:
            log_probs = jnp.where(jnp.arange(vocab) < top_k, log_probs, -jnp.inf)
            log_probs = log_probs - jax.scipy.special.logsumexp(log_probs, axis=-1, keepdims=True)
        return log_probs, ids
    return strategies.filtered_log_probs(logits, scale, top_k, 1.0, False)


def dream_proposal(logits: jax.Array, token_keys: jax.Array, position_keys: jax.Array, *, temperature: float,
                   top_p: float, top_k: int, target: str, pad_id: int,
                   pad_target_penalty: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens, log-probs, scores), each [B, b], from (already shifted) logits [B, b, V]."""
    batch, block, _ = logits.shape
    log_probs, ids = dream_filtered(logits.astype(jnp.float32), temperature=temperature, top_p=top_p, top_k=top_k)
    probs = jnp.exp(log_probs)
    if temperature > 0 and probs.shape[-1] > 1:
        uniform = jax.vmap(lambda k: jax.random.uniform(k, (block,), jnp.float32))(token_keys)
        choice = strategies.inverse_cdf_draw(probs, uniform)
    else:
        choice = jnp.argmax(log_probs, axis=-1)
    tokens = jnp.take_along_axis(ids, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)
    logprob = jnp.take_along_axis(log_probs, choice[..., None], axis=-1)[..., 0]
    if temperature == 0:
        logprob = jnp.zeros_like(logprob)
    if target == "confidence":
        score = jnp.take_along_axis(probs, choice[..., None], axis=-1)[..., 0]
    elif target == "margin_confidence":
        score = _top_two_margin(probs)
    elif target == "neg_entropy":  # correct in the original: most certain first
        score = jnp.sum(probs * jnp.log(probs + DREAM_ENTROPY_EPS), axis=-1)
    elif target == "random":
        score = jax.vmap(lambda k: jax.random.uniform(k, (block,), jnp.float32))(position_keys)
    else:
        raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
    score = jnp.where(tokens == pad_id, score / pad_target_penalty, score)
    return tokens, logprob, score


def dynamic_selection(masked: jax.Array, score: jax.Array, threshold: float) -> jax.Array:
    """Every masked position scoring >= threshold; if none, the best masked one."""
    confident = masked & (score >= threshold)
    best = strategies.low_confidence_static(masked, score, jnp.ones(masked.shape[:-1], jnp.int32))
    return jnp.where(jnp.any(confident, axis=-1, keepdims=True), confident, best)


def dream_step_fractions(steps: int, eps: float) -> np.ndarray:
    """[steps] float32: the share 1 - s/t of the remaining masks Dream's static rule commits at step
    i (t, s = timesteps[i], timesteps[i + 1], timesteps = linspace(1, eps, steps + 1)); 1 (all) at
    the last step. Entry 0 is unused (step 0 commits the block's first token)."""
    times = np.linspace(1.0, eps, steps + 1).astype(np.float32)
    fractions = np.ones(steps, np.float32)
    for i in range(1, steps - 1):
        fractions[i] = np.float32(1.0) - times[i + 1] / times[i]
    return fractions


def schedule_tables(settings: FullDiffusionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per block and step in the block ([num_blocks, max steps per block]): LLaDA's static quota
    (`transfer_schedule`) and Dream's static share (`dream_step_fractions`)."""
    per_block = settings.steps_per_block()
    width = max(per_block)
    quota = np.zeros((len(per_block), width), np.int32)
    share = np.ones((len(per_block), width), np.float32)
    for k, steps in enumerate(per_block):
        quota[k, :steps] = strategies.transfer_schedule(settings.block_length, steps)
        share[k, :steps] = dream_step_fractions(steps, settings.eps)
    return quota, share


def select_positions(plan: _Plan, masked: jax.Array, score: jax.Array, step_in_block: jax.Array,
                     block_steps: jax.Array, quota: jax.Array, share: jax.Array,
                     position_keys: jax.Array) -> jax.Array:
    """[B, b] bool: the masked positions committed at this step of the block.

    `block_steps` is the block's step budget, `quota` / `share` its rows of `schedule_tables`."""
    s = plan.settings
    batch, block = masked.shape
    last = jnp.minimum(step_in_block, block_steps - 1)
    if plan.family == "dream":
        first = jnp.broadcast_to(jnp.arange(block) == 0, masked.shape) & masked
        if s.remasking == "dynamic":
            later = dynamic_selection(masked, score, s.threshold)
        else:
            count = jnp.sum(masked, axis=-1)
            part = jnp.floor(count.astype(jnp.float32) * share[last]).astype(jnp.int32)
            n = jnp.where(step_in_block >= block_steps - 1, count, part)
            if s.alg_temp > 0:  # positions drawn without replacement from softmax(score / alg_temp): Gumbel top-k
                gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (block,), jnp.float32))(position_keys)
                ranked = jnp.where(masked, score / s.alg_temp + gumbel, -jnp.inf)
            else:
                ranked = score
            later = strategies.low_confidence_static(masked, ranked, n)
        return jnp.where(step_in_block == 0, first, later)
    if s.remasking == "dynamic":
        return dynamic_selection(masked, score, s.threshold)
    return strategies.low_confidence_static(masked, score, jnp.broadcast_to(quota[last], (batch,)))


# ----------------------------------------------------------------------------------------------
# Forwards
# ----------------------------------------------------------------------------------------------


def span_hidden(model: Decoder, span_tokens: jax.Array, q_start: jax.Array, pad_count: jax.Array,
                k_all: jax.Array, v_all: jax.Array, key_visible: jax.Array, own: int = 1) -> jax.Array:
    """Last hidden states [B, W, hidden] of canvas columns [q_start, q_start + W) against a cache.

    The keys are the cached K/V ([layers, B, T, Hkv, D]) in canvas order with the span's fresh K/V
    in its own columns, restricted to `key_visible` [B, T]. With caches computed from the current
    canvas this is the full forward's value at these columns (the same keys in the same order
    through the same attention function); the caches' staleness is the only approximation.

    Attention: the reference (`masked_attention`), or with `attention_impl` resolving to "pallas"
    the decode kernel (`ops.pallas.dispatch.visible_keys_attention`): the span's first `own`
    columns (the block, with Dream's column before it; visible in every row) are its block keys,
    the other visible columns its per-row cache.
    """
    batch, width = span_tokens.shape
    positions = q_start + jnp.arange(width, dtype=jnp.int32)[None, :] - pad_count[:, None]
    kernel = attention_ops.resolve_impl(model.config.attention_impl) == "pallas"
    if kernel:
        packing = dispatch.pack_visible_keys(key_visible, q_start, own)
    else:
        mask = jnp.broadcast_to(key_visible[:, None, :], (batch, width, key_visible.shape[1]))

    def body(x, layer):
        p, k_cache, v_cache = layer
        q, k, v = model.qkv(p, x, positions)
        keys = jax.lax.dynamic_update_slice_in_dim(k_cache.astype(k.dtype), k, q_start, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(v_cache.astype(v.dtype), v, q_start, axis=1)
        if kernel:
            attn = dispatch.visible_keys_attention(q, keys, values, packing, k[:, :own], v[:, :own])
        else:
            attn = attention_ops.masked_attention(q, keys, values, mask)
        return model.finish_layer(p, x, attn), None

    hidden, _ = model.layer_loop(body, model.embed(span_tokens), model.layer_params(), k_all, v_all)
    return hidden


def _full_hidden(model: Decoder, canvas: jax.Array, pad_count: jax.Array, *, return_kv: bool):
    columns = jnp.arange(canvas.shape[1], dtype=jnp.int32)[None, :]
    valid = columns >= pad_count[:, None]
    positions = jnp.maximum(columns - pad_count[:, None], 0)
    return model.hidden_states(canvas, positions, full_segments(valid), MaskRule.FULL, return_kv=return_kv)


def span_width(plan: _Plan) -> int:
    """Columns a cached step forwards: the block (dual), or the block and `further_horizon` columns
    after it, all of them without a horizon (prefix); plus, for Dream, the column before the block."""
    s = plan.settings
    if s.cache == "dual":
        return s.block_length + plan.shift
    horizon = s.gen_length if s.further_horizon is None else s.further_horizon
    return s.block_length + min(horizon, s.gen_length - s.block_length) + plan.shift


# ----------------------------------------------------------------------------------------------
# The compiled generate
# ----------------------------------------------------------------------------------------------

_PER_ROW = ("canvas", "trace", "logprob", "row_step", "done")


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _generate(graphdef: nnx.GraphDef, params: nnx.State, canvas: jax.Array, pad_count: jax.Array,
              row_key_data: jax.Array, plan: _Plan) -> dict[str, jax.Array]:
    """One `lax.while_loop` over (block, step): an iteration denoises the current block one step
    (if a row still has masks in it), then moves to the next block once no row has. Per-row
    inputs and state are split over the mesh's data axes (`_Plan.constrain`)."""
    model: Decoder = nnx.merge(graphdef, params)
    canvas, pad_count = plan.constrain(canvas), plan.constrain(pad_count)
    row_keys = jax.random.wrap_key_data(plan.constrain(row_key_data), impl=plan.key_impl)
    s = plan.settings
    b, big_p, width, shift = s.block_length, plan.prompt_width, plan.width, plan.shift
    batch = canvas.shape[0]
    cached = s.cache != "none"
    window = span_width(plan) if cached else 0
    # the prefix window has a fixed width: near the end it runs into invisible columns past the canvas
    extra = max(0, window - b - shift) if s.cache == "prefix" else 0
    quota, share = (jnp.asarray(x) for x in schedule_tables(s))
    budgets = jnp.asarray(s.steps_per_block(), jnp.int32)
    columns = jnp.arange(width + extra, dtype=jnp.int32)[None, :]
    in_canvas = (columns >= pad_count[:, None]) & (columns < width)

    def block_logits(hidden_rows: jax.Array) -> jax.Array:
        logits = model.hidden_to_logits(hidden_rows)
        return logits.at[..., plan.mask_id].set(-jnp.inf)  # never propose the mask token

    def slice_cols(x, start, size):
        return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)

    def cached_logits(canvas, kv, start):
        q_start = start - shift  # Dream: the column before the block scores its first position
        visible = in_canvas
        if s.cache == "prefix":  # nothing after the window
            visible = visible & (columns < q_start + window)
        hidden = span_hidden(model, slice_cols(canvas, q_start, window), q_start, pad_count, kv[0], kv[1], visible,
                             own=b + shift)
        return block_logits(hidden[:, :b])

    def denoise(c):
        c = dict(c)
        start = big_p + c["block"] * b
        canvas = c["canvas"]
        block_tokens = slice_cols(canvas, start, b)
        masked = block_tokens == plan.mask_id
        active = jnp.any(masked, axis=1) & ~c["done"]
        i = c["step_in_block"]
        if not cached:
            hidden = _full_hidden(model, canvas, pad_count, return_kv=False)
            logits = block_logits(slice_cols(hidden, start - shift, b))
            c["full_forwards"] = c["full_forwards"] + 1
            c["forwards"] = c["forwards"] + 1
        else:
            refresh = i == 0
            if s.refresh_every > 0:
                refresh = refresh | (i % s.refresh_every == 0)

            def with_refresh(kv):
                hidden, (k, v) = _full_hidden(model, canvas[:, :width], pad_count, return_kv=True)
                pad = [(0, 0), (0, 0), (0, extra), (0, 0), (0, 0)]
                new_kv = tuple(plan.constrain(jnp.pad(x, pad).astype(old.dtype), row_axis=1)
                               for x, old in zip((k, v), kv))
                if s.cached_logits_on_refresh:
                    return cached_logits(canvas, new_kv, start), new_kv
                return block_logits(slice_cols(hidden, start - shift, b)), new_kv

            def from_cache(kv):
                return cached_logits(canvas, kv, start), kv

            logits, c["kv"] = jax.lax.cond(refresh, with_refresh, from_cache, c["kv"])
            refreshes = refresh.astype(jnp.int32)
            c["full_forwards"] = c["full_forwards"] + refreshes
            c["forwards"] = c["forwards"] + 1 + (refreshes if s.cached_logits_on_refresh else 0)
        step = c["row_step"] + 1
        token_keys, position_keys = step_keys(row_keys, step)
        if plan.family == "llada":
            tokens, logprob, score = llada_proposal(logits, token_keys, position_keys,
                                                    temperature=s.temperature, target=s.target)
        else:
            tokens, logprob, score = dream_proposal(
                logits, token_keys, position_keys, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                target=s.target, pad_id=plan.pad_id, pad_target_penalty=s.pad_target_penalty)
        chosen = select_positions(plan, masked, score, i, budgets[c["block"]], quota[c["block"]],
                                  share[c["block"]], position_keys) & active[:, None]
        out = start - big_p

        def put(x, new):
            return jax.lax.dynamic_update_slice_in_dim(x, jnp.where(chosen, new, slice_cols(x, out, b)), out, axis=1)

        c["canvas"] = jax.lax.dynamic_update_slice_in_dim(canvas, jnp.where(chosen, tokens, block_tokens), start, axis=1)
        c["trace"] = put(c["trace"], step[:, None])
        c["logprob"] = put(c["logprob"], logprob)
        c["row_step"] = jnp.where(active, step, c["row_step"])
        c["step_in_block"] = i + 1
        return c

    def unfinished(c):
        start = big_p + c["block"] * b
        return jnp.any(slice_cols(c["canvas"], start, b) == plan.mask_id, axis=1) & ~c["done"]

    def body(c):
        c = jax.lax.cond(jnp.any(unfinished(c)), denoise, lambda c: dict(c), c)
        c = dict(c)
        finished = ~jnp.any(unfinished(c))
        # a row whose finished block is all EOS/pad ends: the rest of its canvas becomes pad
        start = big_p + c["block"] * b
        block_tokens = slice_cols(c["canvas"], start, b)
        ended = finished & jnp.all((block_tokens == plan.eos_id) | (block_tokens == plan.pad_id), axis=1) & ~c["done"]
        after = (columns >= start + b) & (columns < width)
        c["canvas"] = jnp.where(ended[:, None] & after, plan.pad_id, c["canvas"])
        c["done"] = c["done"] | ended
        c["block"] = c["block"] + finished.astype(jnp.int32)
        c["step_in_block"] = jnp.where(finished, 0, c["step_in_block"])
        c["iterations"] = c["iterations"] + 1
        return c

    def cond(c):  # every block ends within block_length + 1 steps; the cap only guards the loop
        return (c["block"] < s.num_blocks) & (c["iterations"] < s.num_blocks * (b + 2))

    carry = dict(
        canvas=jnp.pad(canvas, [(0, 0), (0, extra)], constant_values=plan.pad_id),
        trace=jnp.zeros((batch, s.gen_length), jnp.int32),
        logprob=jnp.zeros((batch, s.gen_length), jnp.float32),
        row_step=jnp.zeros((batch,), jnp.int32),
        done=jnp.zeros((batch,), bool),
        block=jnp.zeros((), jnp.int32),
        step_in_block=jnp.zeros((), jnp.int32),
        iterations=jnp.zeros((), jnp.int32),
        forwards=jnp.zeros((), jnp.int32),
        full_forwards=jnp.zeros((), jnp.int32),
    )
    if cached:
        config = model.config
        shape = (config.num_layers, batch, width + extra, config.num_kv_heads, config.head_dim)
        zeros = plan.constrain(jnp.zeros(shape, model.embed(canvas[:1, :1]).dtype), row_axis=1)  # compute dtype
        carry["kv"] = (zeros, zeros)
    carry = {name: plan.constrain(x) if name in _PER_ROW else x for name, x in carry.items()}
    carry = jax.lax.while_loop(cond, body, carry)
    return {"response": carry["canvas"][:, big_p:width], "trace": carry["trace"], "logprob": carry["logprob"],
            "num_steps": carry["row_step"], "forwards": carry["forwards"], "full_forwards": carry["full_forwards"]}


# ----------------------------------------------------------------------------------------------
# Host API
# ----------------------------------------------------------------------------------------------


class FullDiffusionSampler:
    """Generates from a LLaDA or Dream model: `FullDiffusionSampler(model, sampling).generate(prompt_ids)`.

    `settings`: a `FullDiffusionConfig`, or the config's `SamplingConfig` (`from_sampling`). Returns
    the block-diffusion sampler's `Rollout` (rows of a prompt adjacent, `num_samples` per prompt). A
    response ends at (and includes) its first EOS, pad or stop token; `lengths` counts that far, and
    the arrays hold pad / 0 beyond. `num_forwards` counts model calls (full or cached), summed over
    the waves.

    Concurrency (the rollout engine's `max_active`): the canvas has a fixed width, so there is no
    continuous batching: the rows run in **waves** of at most `max_active` rows per data-parallel
    replica (`max_active` x replicas rows, split over the mesh's data axes), one after the other
    through the same compiled program (one per (wave rows, prompt width) shape; the last wave is
    topped up with copies of row 0, dropped). A row decodes the same in any wave (its own key, its
    own keys in attention), so results do not depend on `max_active` or the mesh.
    """

    def __init__(self, model: Decoder, settings: FullDiffusionConfig | SamplingConfig, *, mesh: Mesh | None = None):
        config = model.config
        if config.family not in FAMILIES:
            raise ConfigError(f"model.family: the full-attention sampler serves {list(FAMILIES)}, got {config.family!r}")
        self.seed = 0
        if isinstance(settings, SamplingConfig):
            self.seed = settings.seed
            settings = FullDiffusionConfig.from_sampling(settings, config.family)
        if config.family == "llada" and (settings.top_k > 0 or settings.top_p < 1):
            _fail("top_k", "LLaDA's Gumbel-max sampling has no top-k/top-p filter (use top_k=0, top_p=1)")
        self.model_config = config
        self.settings = settings
        self.mesh = mesh
        self.replicas = 1 if mesh is None else data_parallel_size(mesh, "rollout")
        self.graphdef, self._model_params = nnx.split(model)
        self.last_full_forwards = 0

    # ------------------------------------------------------------------ placement

    @functools.cached_property
    def params(self) -> nnx.State:
        """The model's weights as the sampler streams them (placed on first use)."""
        return self._place(self._model_params)

    def _place(self, params: nnx.State) -> nnx.State:
        """The compute dtype (`rollout_params`), the rollout's sharding on a mesh; on CPU without a
        mesh one array per layer (the forwards read weights in place instead of slicing copies)."""
        params = rollout_params(params, self.model_config)
        if self.mesh is not None:
            return shard_params(params, self.mesh, role="rollout")
        return per_layer_view(params) if jax.default_backend() == "cpu" else params

    def abstract_params(self) -> nnx.State:
        """The placed weights' shapes, dtypes and shardings (no memory), as `_place` lays them out
        on a mesh (for `programs`)."""
        abstract = jax.eval_shape(lambda p: rollout_params(p, self.model_config), self._model_params)
        if self.mesh is None:
            return abstract
        leaves, treedef = jax.tree.flatten(abstract)
        shardings = jax.tree.leaves(state_shardings(abstract, self.mesh, "rollout"))
        return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
                                  for x, sh in zip(leaves, shardings, strict=True)])

    def wave_rows(self, rows: int) -> int:
        """Rows per wave for `rows` rows: at most `max_active` per replica, a multiple of the replicas."""
        per_replica = min(self.settings.max_active, -(-rows // self.replicas))
        return per_replica * self.replicas

    def prompt_width(self, longest: int) -> int:
        """The canvas' prompt region for a longest prompt of `longest` tokens (its bucket, if any)."""
        buckets = self.settings.prompt_buckets
        return prompt_bucket(longest, buckets) if buckets else longest

    def _plan(self, prompt_width: int) -> _Plan:
        c = self.model_config
        key_impl = str(jax.random.key_impl(jax.random.key(0)))
        return _Plan(self.settings, c.family, prompt_width, c.mask_token_id, c.eos_token_id, c.pad_token_id,
                     key_impl=key_impl, mesh=self.mesh, kv_heads=c.num_kv_heads)

    def _rows_on_mesh(self, x: np.ndarray) -> jax.Array:
        return jnp.asarray(x) if self.mesh is None else shard_batch(x, self.mesh, role="rollout")

    def programs(self, rows: int, prompt_len: int) -> dict[str, tuple]:
        """The jitted function `generate` runs for `rows` rows with prompts of up to `prompt_len`
        tokens, as {name: (jitted_fn, args, kwargs)} with abstract arguments laid out on this
        sampler's mesh (static arguments concrete): `fn.lower(*args, **kwargs).compile()` compiles
        exactly what `generate` runs, once per wave (works on a sampler of `abstract_model`)."""
        width = self.prompt_width(prompt_len)
        wave = self.wave_rows(rows)
        plan = self._plan(width)
        key_shape = jax.random.key_data(jax.random.key(0)).shape

        def per_row(shape, dtype):
            sharding = None if self.mesh is None else batch_sharding(self.mesh, len(shape), "rollout")
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        args = (self.graphdef, self.abstract_params(), per_row((wave, plan.width), jnp.int32),
                per_row((wave,), jnp.int32), per_row((wave, *key_shape), jnp.uint32), plan)
        return {"generate": (_generate, args, {})}

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Sequence[int]], rng: int | jax.Array | None = None, *,
                 row_ids: Sequence[int] | None = None, prompt_width: int | None = None,
                 params: nnx.State | None = None) -> Rollout:
        """`rng`: a key or int seed (default: the sampling seed, 0 for a `FullDiffusionConfig`);
        `row_ids` (default 0..N-1) key each row's randomness; `prompt_width` (default: the longest
        prompt, rounded up to a prompt bucket) is the canvas' prompt region, the prompts
        left-padded into it; `params` replace the model's weights (RL updates)."""
        s, c = self.settings, self.model_config
        prompt_arrays = []
        for i, prompt in enumerate(prompts):
            ids = np.asarray(prompt)
            if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"prompts[{i}] must be a non-empty 1-D sequence of token ids")
            if ids.min() < 0 or ids.max() >= c.vocab_size:
                raise ValueError(f"prompts[{i}] holds a token id outside [0, vocab_size={c.vocab_size})")
            prompt_arrays.append(ids.astype(np.int32))
        if not prompt_arrays:
            raise ValueError("prompts: no prompts given")
        rows = [p for p in prompt_arrays for _ in range(s.num_samples)]
        longest = max(len(p) for p in rows)
        width = self.prompt_width(longest) if prompt_width is None else prompt_width
        if width < longest:
            raise ValueError(f"prompt_width {width} is shorter than the longest prompt")
        canvas = np.full((len(rows), width + s.gen_length), c.mask_token_id, np.int32)
        pad_count = np.zeros(len(rows), np.int32)
        for r, p in enumerate(rows):
            pad_count[r] = width - len(p)
            canvas[r, :pad_count[r]] = c.pad_token_id
            canvas[r, pad_count[r]:width] = p
        ids = np.arange(len(rows)) if row_ids is None else np.asarray(row_ids)
        if ids.shape != (len(rows),):
            raise ValueError(f"row_ids: expected {len(rows)} ids, got shape {ids.shape}")
        rng = self.seed if rng is None else rng
        key = rng if isinstance(rng, jax.Array) else jax.random.key(rng)
        row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(ids, jnp.int32))
        key_data = np.asarray(jax.random.key_data(row_keys))
        plan = self._plan(width)
        params = self.params if params is None else self._place(params)
        wave = self.wave_rows(len(rows))
        total = -(-len(rows) // wave) * wave
        filler = np.zeros(total - len(rows), np.int64)  # the last wave topped up with row 0 (dropped)
        canvas, pad_count, key_data = (np.concatenate([x, x[filler]]) for x in (canvas, pad_count, key_data))
        waves = []
        for start in range(0, total, wave):
            part = slice(start, start + wave)
            out = _generate(self.graphdef, params, self._rows_on_mesh(canvas[part]), self._rows_on_mesh(pad_count[part]),
                            self._rows_on_mesh(key_data[part]), plan)
            waves.append({name: to_host(x) for name, x in out.items()})
        out = {name: np.concatenate([w[name] for w in waves])[: len(rows)] if waves[0][name].ndim
               else sum(int(w[name]) for w in waves) for name in waves[0]}
        self.last_full_forwards = int(out["full_forwards"])
        return self._rollout(out, rows, len(prompt_arrays))

    def _rollout(self, out: dict, rows: list[np.ndarray], num_prompts: int) -> Rollout:
        c, s = self.model_config, self.settings
        cap = s.gen_length if s.max_new_tokens is None else s.max_new_tokens
        tokens = np.array(out["response"])[:, :cap]
        trace, logprobs = np.array(out["trace"])[:, :cap], np.array(out["logprob"])[:, :cap]
        stops = np.isin(tokens, np.array([c.eos_token_id, c.pad_token_id, *s.stop_token_ids]))
        hit_stop = stops.any(axis=1)
        lengths = np.where(hit_stop, np.argmax(stops, axis=1) + 1, cap).astype(np.int32)
        beyond = np.arange(cap)[None, :] >= lengths[:, None]
        tokens[beyond], trace[beyond], logprobs[beyond] = c.pad_token_id, 0, 0.0
        return Rollout(
            tokens=tokens, lengths=lengths, trace=trace, logprobs=logprobs, hit_stop=hit_stop,
            num_steps=np.asarray(out["num_steps"], np.int32),
            prompt_index=np.repeat(np.arange(num_prompts, dtype=np.int32), s.num_samples),
            prompt_lengths=np.array([len(p) for p in rows], np.int32),
            num_forwards=int(out["forwards"]), prefill_forwards=0)


def sampler_for(model: Decoder, sampling: SamplingConfig, *, mesh: Mesh | None = None):
    """The sampler of the model's family, from the config's `sampling`: the full-attention sampler
    for LLaDA and Dream, the block-diffusion rollout engine for SDAR/TraDo. Both take
    `generate(prompts, rng=..., params=...)` and `programs(rows, prompt_len)`."""
    if model.config.family in FAMILIES:
        return FullDiffusionSampler(model, sampling, mesh=mesh)
    return BlockDiffusionSampler(model, sampling, mesh=mesh)

"""Token proposal and remasking strategies of the block-diffusion sampler, as pure array functions.

Spec sections 2.1 and 2.2. Every function works on one denoising block per row, shape [..., b]
(the sampler calls them on [batch, b]); none of them knows about models or caches.

Proposal (`sample_tokens`): temperature, then top-k, then top-p (nucleus), then one draw per
position from the renormalised distribution, by inverse CDF from one uniform number per position
(`inverse_cdf_draw`): the cost of the randomness does not grow with the vocabulary (a Gumbel or
categorical draw needs one random number per logit, 32k-150k per position). The *confidence* is the probability of the drawn
token under that filtered distribution (so with `top_k=1` every confidence is 1.0), its log is
the sampler's log-prob of the token, and the entropy of the filtered distribution drives
`entropy_bounded`.

Selection (`select_transfer` and the four strategies): which still-masked positions of the block
are committed this step. Deliberate differences from the original (spec section 10):
  * only positions that are still masked can be selected, and top-k counts only masked positions
    (item 11: the original's `topk` could pick decoded or prompt-residual positions and overwrite
    them when fewer masks remained than the step's quota);
  * ties in confidence (always the case under greedy `top_k=1`, item 14) are broken by position,
    lowest first, so greedy static decoding is deterministic: left to right;
  * `entropy_bounded` commits at least the step's scheduled count (the original commits at least
    one, and a block could end with masks that were then committed as `<|MASK|>` tokens, item 12).
    With `denoising_steps == block_size` (the default, quota 1) this equals the original.
"""

from __future__ import annotations

import dataclasses
import typing

import jax
import jax.numpy as jnp
import numpy as np

from tradojax.config import RemaskingStrategy

STRATEGIES: tuple[str, ...] = typing.get_args(RemaskingStrategy)  # the names live in config (one list)


def transfer_schedule(block_size: int, steps: int) -> np.ndarray:
    """Tokens to commit at each denoising step of a block: `block_size // steps` per step, plus
    one for each of the first `block_size % steps` steps (e.g. b=8, steps=3 -> [3, 3, 2])."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if not 1 <= steps <= block_size:
        raise ValueError(f"denoising steps must be in [1, block_size={block_size}], got {steps}")
    base, extra = divmod(block_size, steps)
    return np.array([base + (1 if step < extra else 0) for step in range(steps)], np.int32)


# ----------------------------------------------------------------------------------------------
# Proposal
# ----------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Proposal:
    """One proposed token per position, with its statistics under the filtered distribution."""

    tokens: jax.Array  # int32 [..., b]
    confidence: jax.Array  # float32: probability of the token
    logprob: jax.Array  # float32: log of that probability
    entropy: jax.Array  # float32: entropy of the filtered distribution (nats); zeros if not asked


def filtered_log_probs(
    logits: jax.Array, temperature: jax.Array | float, top_k: int, top_p: jax.Array | float, use_top_p: bool
) -> tuple[jax.Array, jax.Array]:
    """The filtered distribution over a candidate axis: (log_probs [..., C], token_ids [..., C]).

    With `top_k > 0` the candidates are the k largest logits (exactly k: ties at the k-th value go
    to the lower token id, as `lax.top_k` orders them), else the whole vocabulary sorted by logit
    (the sort is needed only for top-p). Removed candidates get log-prob -inf. Top-p keeps the
    smallest prefix (by probability) whose cumulative probability exceeds `top_p`, i.e. candidate j
    stays iff the probability of the candidates before it is <= `top_p`; the top one always stays.
    `use_top_p` is static: False skips the nucleus filter (top_p == 1).
    """
    vocab = logits.shape[-1]
    scaled = logits.astype(jnp.float32) / temperature
    if 0 < top_k < vocab:
        values, token_ids = jax.lax.top_k(scaled, top_k)
    elif use_top_p:
        order = jnp.argsort(-scaled, axis=-1, stable=True)
        values = jnp.take_along_axis(scaled, order, axis=-1)
        token_ids = order
    else:
        values = scaled
        token_ids = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), scaled.shape)
    log_probs = jax.nn.log_softmax(values, axis=-1)
    if use_top_p:  # candidates are sorted by descending probability here
        probs = jnp.exp(log_probs)
        before = jnp.cumsum(probs, axis=-1) - probs
        keep = before <= top_p
        keep = keep.at[..., 0].set(True)
        log_probs = jnp.where(keep, log_probs, -jnp.inf)
        log_probs = log_probs - jax.scipy.special.logsumexp(log_probs, axis=-1, keepdims=True)
    return log_probs, token_ids.astype(jnp.int32)


CDF_CHUNK = 256  # candidates per chunk of the two-level inverse-CDF search


def _last_positive(weights: jax.Array) -> jax.Array:
    """Index of the last entry > 0 along the last axis (0 if none)."""
    size = weights.shape[-1]
    return size - 1 - jnp.argmax(jnp.flip(weights > 0, axis=-1), axis=-1)


def _first_above(cumulative: jax.Array, target: jax.Array, weights: jax.Array) -> jax.Array:
    """The first index whose cumulative weight exceeds `target`, never one of weight 0: an entry
    of weight 0 repeats its predecessor's cumulative value, so it is passed whenever that one is;
    rounding that leaves `target` at or past the total falls back to the last positive entry."""
    index = jnp.sum(cumulative <= target[..., None], axis=-1)
    return jnp.minimum(index, _last_positive(weights))


def inverse_cdf_draw(probs: jax.Array, uniform: jax.Array, chunk: int = CDF_CHUNK) -> jax.Array:
    """Index i with probability probs[..., i] / sum(probs), from one uniform in [0, 1) per row.

    probs [..., C] >= 0 (zero entries are never drawn), uniform [...]. Two levels for large C: pick
    the chunk of `chunk` candidates by the cumulative chunk totals, then the candidate inside it,
    so only C / chunk + chunk cumulative sums are formed, not C. Exact in distribution up to float32
    rounding of the cumulative sums (relative 1e-7).
    """
    size = probs.shape[-1]
    if size <= chunk:
        cumulative = jnp.cumsum(probs, axis=-1)
        return _first_above(cumulative, uniform * cumulative[..., -1], probs)
    pad = -size % chunk
    chunks = jnp.pad(probs, [(0, 0)] * (probs.ndim - 1) + [(0, pad)]).reshape(*probs.shape[:-1], -1, chunk)
    totals = jnp.sum(chunks, axis=-1)
    cumulative = jnp.cumsum(totals, axis=-1)
    target = uniform * cumulative[..., -1]
    which = _first_above(cumulative, target, totals)
    before = jnp.where(which > 0, jnp.take_along_axis(cumulative, jnp.maximum(which - 1, 0)[..., None], -1)[..., 0], 0.0)
    inside = jnp.take_along_axis(chunks, which[..., None, None], axis=-2)[..., 0, :]
    offset = _first_above(jnp.cumsum(inside, axis=-1), target - before, inside)
    return which * chunk + offset


def sample_tokens(
    logits: jax.Array,
    key: jax.Array,
    *,
    temperature: jax.Array | float = 1.0,
    top_k: int = 0,
    top_p: jax.Array | float = 1.0,
    use_top_p: bool | None = None,
    with_entropy: bool = False,
) -> Proposal:
    """Draws one token per position from the filtered distribution of `logits` [..., V].

    `top_k` is static (0 = off, 1 = greedy); `temperature` and `top_p` may be traced scalars, in
    which case `use_top_p` (static) says whether to apply the nucleus filter at all. With
    `top_k == 1` no randomness is used (the draw is the argmax).
    """
    if use_top_p is None:
        use_top_p = float(top_p) < 1.0
    log_probs, token_ids = filtered_log_probs(logits, temperature, top_k, top_p, use_top_p)
    probs = jnp.exp(log_probs)
    if log_probs.shape[-1] == 1:
        choice = jnp.zeros(log_probs.shape[:-1], jnp.int32)
    else:  # one uniform per position: the key's draws do not depend on the vocabulary
        choice = inverse_cdf_draw(probs, jax.random.uniform(key, log_probs.shape[:-1], jnp.float32))
    tokens = jnp.take_along_axis(token_ids, choice[..., None], axis=-1)[..., 0]
    logprob = jnp.take_along_axis(log_probs, choice[..., None], axis=-1)[..., 0]
    if with_entropy:
        entropy = -jnp.sum(jnp.where(probs > 0, probs * log_probs, 0.0), axis=-1)
    else:
        entropy = jnp.zeros_like(logprob)
    return Proposal(tokens, jnp.exp(logprob), logprob, entropy)


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------


def _rank_among_masked(masked: jax.Array, score: jax.Array, descending: bool) -> jax.Array:
    """Rank (0 = first) of each position among the masked ones of its row, by score, ties broken
    by position (lowest first). Unmasked positions get rank b (never selected). O(b^2): b is small."""
    b = masked.shape[-1]
    s_i = score[..., :, None]  # the position being ranked
    s_o = score[..., None, :]  # the others
    better = (s_o > s_i) if descending else (s_o < s_i)
    position = jnp.arange(b)
    earlier_tie = (s_o == s_i) & (position[None, :] < position[:, None])
    ahead = masked[..., None, :] & (better | earlier_tie)
    rank = jnp.sum(ahead, axis=-1)
    return jnp.where(masked, rank, b)


def sequential(masked: jax.Array, num_transfer: jax.Array) -> jax.Array:
    """The first `num_transfer` masked positions, left to right."""
    order = jnp.cumsum(masked, axis=-1)  # 1-based index among masked positions
    return masked & (order <= jnp.asarray(num_transfer)[..., None])


def low_confidence_static(masked: jax.Array, confidence: jax.Array, num_transfer: jax.Array) -> jax.Array:
    """The `num_transfer` most confident masked positions (ties: lowest position first)."""
    rank = _rank_among_masked(masked, confidence, descending=True)
    return masked & (rank < jnp.asarray(num_transfer)[..., None])


def low_confidence_dynamic(
    masked: jax.Array, confidence: jax.Array, num_transfer: jax.Array, threshold: jax.Array | float
) -> jax.Array:
    """Every masked position with confidence strictly above `threshold`; if fewer than
    `num_transfer` qualify, the `num_transfer` most confident instead (the union of both sets)."""
    confident = masked & (confidence > threshold)
    return confident | low_confidence_static(masked, confidence, num_transfer)


def entropy_bounded(
    masked: jax.Array, entropy: jax.Array, num_transfer: jax.Array, bound: jax.Array | float
) -> jax.Array:
    """Masked positions in ascending entropy: the longest prefix whose cumulative entropy stays
    strictly below `bound`, and at least `num_transfer` of them (ties: lowest position first)."""
    rank = _rank_among_masked(masked, entropy, descending=False)
    # cumulative entropy up to and including each position, in rank order
    not_after = masked[..., None, :] & (rank[..., None, :] <= rank[..., :, None])
    cumulative = jnp.sum(jnp.where(not_after, entropy[..., None, :], 0.0), axis=-1)
    at_least = jnp.maximum(jnp.asarray(num_transfer), 1)[..., None]
    return masked & ((cumulative < bound) | (rank < at_least))


def select_transfer(
    strategy: str,
    masked: jax.Array,
    proposal: Proposal,
    num_transfer: jax.Array,
    *,
    dynamic_threshold: jax.Array | float = 0.9,
    eb_threshold: jax.Array | float = 0.35,
) -> jax.Array:
    """[..., b] bool: the positions to commit this step under `strategy` (a subset of `masked`)."""
    if strategy == "sequential":
        return sequential(masked, num_transfer)
    if strategy == "low_confidence_static":
        return low_confidence_static(masked, proposal.confidence, num_transfer)
    if strategy == "low_confidence_dynamic":
        return low_confidence_dynamic(masked, proposal.confidence, num_transfer, dynamic_threshold)
    if strategy == "entropy_bounded":
        return entropy_bounded(masked, proposal.entropy, num_transfer, eb_threshold)
    raise ValueError(f"remasking_strategy must be one of {list(STRATEGIES)}, got {strategy!r}")

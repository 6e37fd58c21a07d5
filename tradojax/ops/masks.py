"""Attention mask rules as predicates over per-token segment ids.

Every token carries three small integers (a `Segments`):
  * `block`: its diffusion block id (blocks of the same id attend to each other bidirectionally);
  * `kind`:  CONTEXT (prompt / committed text), CLEAN (clean copy of the response in training) or
             NOISY (noisy copy of the response in training; at inference the current block is
             CONTEXT too, the rule then reduces to plain block-causal attention);
  * `valid`: False for padding, which no query may see.

The rules (spec section 1.2):
  * `BLOCK_DIFFUSION`: a CONTEXT/CLEAN query sees CONTEXT/CLEAN keys of blocks <= its own; a NOISY
    query sees CONTEXT keys of blocks <= its own, CLEAN keys of blocks < its own, and NOISY keys of
    its own block. With every token CONTEXT this is the inference block-causal mask; with the
    `[prompt | clean | noisy]` layout it is the dual-stream training mask.
  * `FULL`: every valid key (LLaDA, Dream).
A query that would see no key at all (a left-pad row) sees itself only, as the original does, so
that no softmax row is empty. Dense masks are built only by `dense_mask` (reference path, tests);
kernels evaluate `visible` on tiles and use `self_only` per query.
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp
import numpy as np

CONTEXT, CLEAN, NOISY = 0, 1, 2


class MaskRule(enum.Enum):
    BLOCK_DIFFUSION = "block_diffusion"
    FULL = "full"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Segments:
    """Per-token mask ids, each [batch, length]."""

    block: jax.Array  # int32
    kind: jax.Array  # int32: CONTEXT / CLEAN / NOISY
    valid: jax.Array  # bool

    @property
    def shape(self) -> tuple[int, ...]:
        return self.block.shape

    def __getitem__(self, index) -> Segments:
        return Segments(self.block[index], self.kind[index], self.valid[index])


def visible(rule: MaskRule, q_block, q_kind, k_block, k_kind, k_valid):
    """The pairwise rule (broadcasting): may a query with (q_block, q_kind) see the key?"""
    if rule is MaskRule.FULL:
        return k_valid & jnp.ones_like(q_block, dtype=bool)
    q_noisy = q_kind == NOISY
    k_noisy = k_kind == NOISY
    context_query = ~q_noisy & ~k_noisy & (k_block <= q_block)
    noisy_query = q_noisy & (
        ((k_kind == CONTEXT) & (k_block <= q_block))
        | ((k_kind == CLEAN) & (k_block < q_block))
        | (k_noisy & (k_block == q_block))
    )
    return k_valid & (context_query | noisy_query)


def self_only(rule: MaskRule, segments: Segments) -> jax.Array:
    """[B, T] bool: queries that see no key under `rule` (self-attention fallback), in O(T).

    Only valid for self-attention (queries and keys are the same tokens).
    """
    big = jnp.iinfo(jnp.int32).max
    valid = segments.valid
    if rule is MaskRule.FULL:
        return jnp.broadcast_to(~valid.any(axis=-1, keepdims=True), valid.shape)

    def min_block(kind_mask):
        return jnp.min(jnp.where(valid & kind_mask, segments.block, big), axis=-1, keepdims=True)

    first_context = min_block(segments.kind == CONTEXT)
    first_clean = min_block(segments.kind == CLEAN)
    first_not_noisy = jnp.minimum(first_context, first_clean)
    # A valid NOISY query sees itself (noisy tokens are never padding in the training layout).
    has_key = jnp.where(
        segments.kind == NOISY,
        valid | (first_context <= segments.block) | (first_clean < segments.block),
        first_not_noisy <= segments.block,
    )
    return ~has_key


def dense_mask(rule: MaskRule, q: Segments, k: Segments, *, self_attention: bool) -> jax.Array:
    """[B, Tq, Tk] bool mask (reference path). With `self_attention`, empty rows see themselves."""
    mask = visible(
        rule,
        q.block[:, :, None], q.kind[:, :, None],
        k.block[:, None, :], k.kind[:, None, :], k.valid[:, None, :],
    )
    if self_attention:
        eye = jnp.eye(mask.shape[1], mask.shape[2], dtype=bool)[None]
        mask = mask | (eye & ~mask.any(axis=-1, keepdims=True))
    return mask


# ----------------------------------------------------------------------------------------------
# Segment builders for the two layouts
# ----------------------------------------------------------------------------------------------


def inference_segments(positions: jax.Array, valid: jax.Array, block_size: int) -> Segments:
    """Inference: blocks of `block_size` aligned to each sequence's own first prompt token.

    `positions` count from 0 at the first real prompt token of each sequence.
    """
    block = jnp.where(valid, positions // block_size, 0).astype(jnp.int32)
    return Segments(block, jnp.zeros_like(block), valid.astype(bool))


def full_segments(valid: jax.Array) -> Segments:
    zeros = jnp.zeros(valid.shape, jnp.int32)
    return Segments(zeros, zeros, valid.astype(bool))


class BlockAlignment(enum.Enum):
    """How training blocks are placed (spec section 1.2, bug 10.5).

    INFERENCE (the default, a fix): blocks aligned to the prompt start exactly as at inference, so
    a training block is the block the sampler decoded. ORIGINAL: the original's alignment (prompt
    blocks end at the prompt end, response blocks start at the response start), for parity runs.
    """

    INFERENCE = "inference"
    ORIGINAL = "original"


def training_segments(
    prompt_valid: np.ndarray,
    response_length: int,
    block_size: int,
    alignment: BlockAlignment = BlockAlignment.INFERENCE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The `[prompt (L0, left-padded) | clean response (L1) | noisy response (L1)]` layout.

    Args:
      prompt_valid: [B, L0] bool, False on the left pads.
      response_length: L1 (responses are right-padded; response pads stay visible, as in the
        original: block causality makes them harmless).
    Returns numpy (block, kind, valid, positions), each [B, L0 + 2 * L1]; the noisy copy reuses
    the clean copy's positions (spec section 1.3).
    """
    prompt_valid = np.asarray(prompt_valid, bool)
    batch, l0 = prompt_valid.shape
    l1 = response_length
    b = block_size
    prompt_len = prompt_valid.sum(axis=1, keepdims=True)  # P per row
    cols = np.arange(l0)[None, :]
    r = np.arange(l1)[None, :]
    if alignment is BlockAlignment.ORIGINAL:
        prompt_block = -((l0 - 1 - cols) // b) - 1
        response_block = np.broadcast_to(r // b, (batch, l1))
    else:
        prompt_pos = cols - (l0 - prompt_len)  # negative on the left pads
        prompt_block = np.where(prompt_valid, np.maximum(prompt_pos, 0) // b, 0)
        response_block = (prompt_len + r) // b
    prompt_block = np.broadcast_to(prompt_block, (batch, l0))
    block = np.concatenate([prompt_block, response_block, response_block], axis=1).astype(np.int32)
    kind = np.concatenate([
        np.full((batch, l0), CONTEXT), np.full((batch, l1), CLEAN), np.full((batch, l1), NOISY)
    ], axis=1).astype(np.int32)
    valid = np.concatenate([prompt_valid, np.ones((batch, 2 * l1), bool)], axis=1)
    # positions: cumsum over valid tokens - 1 (spec 1.3); the noisy copy reuses the clean ones.
    clean_valid = np.concatenate([prompt_valid, np.ones((batch, l1), bool)], axis=1)
    clean_positions = np.maximum(np.cumsum(clean_valid, axis=1) - 1, 0)
    positions = np.concatenate([clean_positions, clean_positions[:, l0:]], axis=1).astype(np.int32)
    return block, kind, valid, positions

"""Training rows in the `[prompt | clean response | noisy response]` layout (spec 1.2(b), 3.3, 5).

Rows are built on the host from token ids (never re-tokenised text): a prompt, a response, the
positions of the response that are masked in the noisy copy, and the positions that carry loss.
SFT draws the noisy positions at random (`block_sft_masks`); TraceRL derives them from the
sampler's trace (rl/). Both produce the same `Rows`, which `pack_rows` pads to static shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from tradojax.ops.masks import BlockAlignment, Segments, training_segments


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rows:
    """A padded batch of training rows. N = L0 + 2 * L1."""

    tokens: np.ndarray  # [B, N] int32: prompt (left-padded) | clean response | noisy response
    positions: np.ndarray  # [B, N] int32
    segments: Segments  # [B, N] each
    targets: np.ndarray  # [B, L1] int32: the clean response tokens (the labels of the noisy copy)
    loss_mask: np.ndarray  # [B, L1] bool: noisy positions that are trained (p_mask)
    weights: np.ndarray  # [B] float32: per-row scale (1 for SFT; the advantage's row factor in RL)

    @property
    def prompt_length(self) -> int:
        return self.tokens.shape[1] - 2 * self.targets.shape[1]

    @property
    def response_length(self) -> int:
        return self.targets.shape[1]

    def __len__(self) -> int:
        return self.tokens.shape[0]


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_row_inputs(prompts, responses, noisy, trained, prompt_length: int, response_length: int, pad_id: int):
    """Left-pads prompts and right-pads responses; checks the noisy/trained masks.

    Returns (prompt_block [n, L0], prompt_valid [n, L0], response_block [n, L1], noisy [n, L1],
    trained [n, L1]).
    """
    n = len(prompts)
    if not (len(responses) == len(noisy) == len(trained) == n):
        raise ValueError("prompts, responses, noisy and trained must have the same length")
    l0, l1 = prompt_length, response_length
    prompt_block = np.full((n, l0), pad_id, np.int32)
    response_block = np.full((n, l1), pad_id, np.int32)
    prompt_valid = np.zeros((n, l0), bool)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        if len(prompt) > l0:
            raise ValueError(f"row {i}: prompt of {len(prompt)} tokens exceeds prompt_length={l0}")
        if len(response) > l1:
            raise ValueError(f"row {i}: response of {len(response)} tokens exceeds response_length={l1}")
        if len(prompt) == 0:
            raise ValueError(f"row {i}: empty prompt")
        prompt_block[i, l0 - len(prompt):] = prompt
        prompt_valid[i, l0 - len(prompt):] = True
        response_block[i, : len(response)] = response
    noisy_mask = np.stack([np.asarray(m, bool) for m in noisy])
    loss_mask = np.stack([np.asarray(m, bool) for m in trained])
    if noisy_mask.shape != (n, l1) or loss_mask.shape != (n, l1):
        raise ValueError(f"noisy/trained masks must be [rows, {l1}], got {noisy_mask.shape} / {loss_mask.shape}")
    if (loss_mask & ~noisy_mask).any():
        raise ValueError("a trained position must be masked in the noisy copy")
    return prompt_block, prompt_valid, response_block, noisy_mask, loss_mask


def pack_rows(
    prompts: Sequence[np.ndarray],
    responses: Sequence[np.ndarray],
    noisy: Sequence[np.ndarray],
    trained: Sequence[np.ndarray],
    *,
    prompt_length: int,
    response_length: int,
    pad_id: int,
    mask_id: int,
    block_size: int,
    alignment: BlockAlignment = BlockAlignment.INFERENCE,
    weights: Sequence[float] | None = None,
) -> Rows:
    """Pads and lays out rows.

    Args:
      prompts / responses: token id arrays (responses may be shorter than `response_length`: the
        rest is `pad_id`; longer ones raise).
      noisy / trained: bool arrays of length `response_length`: positions replaced by `mask_id`
        in the noisy copy, and positions in the loss.
    """
    prompt_block, prompt_valid, response_block, noisy_mask, loss_mask = pad_row_inputs(
        prompts, responses, noisy, trained, prompt_length, response_length, pad_id)
    n, l1 = len(prompts), response_length
    noisy_copy = np.where(noisy_mask, mask_id, response_block)
    tokens = np.concatenate([prompt_block, response_block, noisy_copy], axis=1).astype(np.int32)
    block, kind, valid, positions = training_segments(prompt_valid, l1, block_size, alignment)
    row_weights = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
    return Rows(tokens, positions, Segments(block, kind, valid), response_block, loss_mask, row_weights)


def trainable_pads(response: np.ndarray, response_length: int, post_num: int) -> np.ndarray:
    """[L1] bool: real response tokens plus the first `post_num` pad positions after them."""
    keep = np.zeros(response_length, bool)
    keep[: min(len(response) + post_num, response_length)] = True
    return keep


def block_sft_masks(
    response_lengths: Sequence[int],
    response_length: int,
    rng: np.random.Generator,
    lower_p: float,
    upper_p: float,
    post_num: int = 0,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Block SFT (the original's `semi-ar`): every response position is masked independently
    with probability p_j ~ U(lower_p, upper_p); masked real tokens (and the first `post_num` pads)
    carry loss. All blocks train at once, each conditioned on the clean blocks before it.
    """
    noisy, trained = [], []
    for length in response_lengths:
        probs = rng.uniform(lower_p, upper_p, size=response_length)
        masked = rng.uniform(size=response_length) < probs
        keep = trainable_pads(np.zeros(length), response_length, post_num)
        if not (masked & keep).any():  # never an empty row: mask one trainable position
            masked[rng.integers(0, max(1, min(length + post_num, response_length)))] = True
        noisy.append(masked)
        trained.append(masked & keep)
    return noisy, trained

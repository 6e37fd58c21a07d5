"""Training rows: a padded batch of prompts, responses and their noisy copies (spec 1.2(b), 3.3, 3.10, 5).

Rows are built on the host from token ids (never re-tokenised text): a prompt, a response, the
positions of the response that are masked in the noisy copy, and the positions that carry loss
(`training/row_masks.py` draws them). One `Rows` type serves both layouts (`RowLayout`):

* DUAL_STREAM (block diffusion, SDAR/TraDo): `[prompt (L0) | clean response (L1) | noisy response (L1)]`
  under the block-diffusion training mask;
* SINGLE_STREAM (full attention, LLaDA/Dream): `[prompt (L0) | noisy response (L1)]` under the full
  mask; left pads of the prompt are invisible keys, so a row's loss does not depend on its bucket.

In both the noisy response is the last L1 columns; `pack_rows` pads to static shapes.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Sequence

import jax
import numpy as np

from tradojax.ops.masks import BlockAlignment, MaskRule, Segments, training_segments


class RowLayout(enum.Enum):
    DUAL_STREAM = "dual_stream"  # [prompt | clean | noisy], MaskRule.BLOCK_DIFFUSION
    SINGLE_STREAM = "single_stream"  # [prompt | noisy], MaskRule.FULL

    @property
    def mask_rule(self) -> MaskRule:
        return MaskRule.BLOCK_DIFFUSION if self is RowLayout.DUAL_STREAM else MaskRule.FULL

    @property
    def response_copies(self) -> int:
        return 2 if self is RowLayout.DUAL_STREAM else 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rows:
    """A padded batch of training rows. N = L0 + 2 * L1 (dual stream) or L0 + L1 (single stream)."""

    tokens: np.ndarray  # [B, N] int32: prompt (left-padded) | [clean response |] noisy response
    positions: np.ndarray  # [B, N] int32: 0 at the first real prompt token
    segments: Segments  # [B, N] each
    targets: np.ndarray  # [B, L1] int32: the clean response tokens (the labels of the noisy copy)
    loss_mask: np.ndarray  # [B, L1] bool: noisy positions that are trained (p_mask)
    weights: np.ndarray  # [B] float32: per-row scale (0 for padding rows; RL: the advantage's row factor)
    layout: RowLayout = dataclasses.field(default=RowLayout.DUAL_STREAM, metadata=dict(static=True))

    @property
    def prompt_length(self) -> int:
        return self.tokens.shape[1] - self.layout.response_copies * self.targets.shape[1]

    @property
    def response_length(self) -> int:
        return self.targets.shape[1]

    def __len__(self) -> int:
        return self.tokens.shape[0]


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_row_inputs(prompts, responses, noisy, trained, prompt_length: int, response_length: int, pad_id: int):
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
    block_size: int | None = None,
    alignment: BlockAlignment = BlockAlignment.INFERENCE,
    weights: Sequence[float] | None = None,
    layout: RowLayout = RowLayout.DUAL_STREAM,
) -> Rows:
    """Pads and lays out rows.

    Args:
      prompts / responses: token id arrays (responses may be shorter than `response_length`: the
        rest is `pad_id`; longer ones raise).
      noisy / trained: bool arrays of length `response_length`: positions replaced by `mask_id`
        in the noisy copy, and positions in the loss.
      block_size / alignment: the training blocks of the dual-stream layout (unused single-stream).
      weights: per-row scale (default 1).
    """
    prompt_block, prompt_valid, response_block, noisy_mask, loss_mask = _pad_row_inputs(
        prompts, responses, noisy, trained, prompt_length, response_length, pad_id)
    n, l1 = len(prompts), response_length
    noisy_copy = np.where(noisy_mask, mask_id, response_block)
    row_weights = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
    if layout is RowLayout.SINGLE_STREAM:
        tokens = np.concatenate([prompt_block, noisy_copy], axis=1).astype(np.int32)
        valid = np.concatenate([prompt_valid, np.ones((n, l1), bool)], axis=1)
        positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
        segments = Segments(np.zeros(valid.shape, np.int32), np.zeros(valid.shape, np.int32), valid)  # one block
        return Rows(tokens, positions, segments, response_block, loss_mask, row_weights, layout)
    if block_size is None:
        raise ValueError("pack_rows: the dual-stream layout needs block_size")
    tokens = np.concatenate([prompt_block, response_block, noisy_copy], axis=1).astype(np.int32)
    block, kind, valid, positions = training_segments(prompt_valid, l1, block_size, alignment)
    return Rows(tokens, positions, Segments(block, kind, valid), response_block, loss_mask, row_weights, layout)

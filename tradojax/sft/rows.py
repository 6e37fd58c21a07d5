"""Single-stream SFT rows for full-attention models (LLaDA, Dream; spec sections 3.10, 4 and 5).

A full-attention model needs no clean copy: a row is `[prompt (L0, left-padded) | noisy response
(L1, right-padded)]`, run with `MaskRule.FULL`, and the loss is read at the masked response
positions. The mask builders below give, per example, a list of (noisy, trained) boolean arrays of
length L1, like `training/rows.py` does for the dual-stream layout:

* `semi_ar_masks`: one row per response block i; later blocks fully masked, block i partly masked,
  earlier blocks clean; block i's masked tokens are trained.
* `random_masking_masks`: m rows, each masking the response with one t ~ U(lower_p, upper_p).
* `full_trace_masks`: one row per (shrunk) decoding step over the whole response.

Tail pads beyond `post_num` are always masked in the input and never trained (the original's
LLaDA/Dream rule): at inference the model never sees the pads that follow the end of a response.
Unlike the original LLaDA scripts, left pads of the prompt are invisible keys (the original LLaDA
attends to them), so a row's loss does not depend on how much it was padded (length buckets).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from tradojax.ops.masks import BlockAlignment
from tradojax.training.traces import shrink_steps, trace_rounds
from tradojax.training.rows import pad_row_inputs, trainable_pads

Masks = list[tuple[np.ndarray, np.ndarray]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FullRows:
    """A padded batch of single-stream rows. T = L0 + L1."""

    tokens: np.ndarray  # [B, T] int32: prompt (left-padded) | noisy response (right-padded)
    positions: np.ndarray  # [B, T] int32: 0 at the first real prompt token
    valid: np.ndarray  # [B, T] bool: False on the prompt's left pads (keys nobody sees)
    targets: np.ndarray  # [B, L1] int32: the clean response tokens
    loss_mask: np.ndarray  # [B, L1] bool: masked positions that are trained
    weights: np.ndarray  # [B] float32: per-row scale (0 for padding rows)

    @property
    def prompt_length(self) -> int:
        return self.tokens.shape[1] - self.targets.shape[1]

    @property
    def response_length(self) -> int:
        return self.targets.shape[1]

    def __len__(self) -> int:
        return self.tokens.shape[0]


def pack_full_rows(
    prompts: Sequence[np.ndarray],
    responses: Sequence[np.ndarray],
    noisy: Sequence[np.ndarray],
    trained: Sequence[np.ndarray],
    *,
    prompt_length: int,
    response_length: int,
    pad_id: int,
    mask_id: int,
    weights: Sequence[float] | None = None,
) -> FullRows:
    """Pads and lays out single-stream rows (the arguments mean what they mean in `pack_rows`)."""
    prompt_block, prompt_valid, response_block, noisy_mask, loss_mask = pad_row_inputs(
        prompts, responses, noisy, trained, prompt_length, response_length, pad_id)
    n, l1 = len(prompts), response_length
    tokens = np.concatenate([prompt_block, np.where(noisy_mask, mask_id, response_block)], axis=1).astype(np.int32)
    valid = np.concatenate([prompt_valid, np.ones((n, l1), bool)], axis=1)
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    row_weights = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
    return FullRows(tokens, positions, valid, response_block, loss_mask, row_weights)


def padded_steps(trace: np.ndarray | None, response_tokens: int, response_length: int) -> np.ndarray:
    """[L1] decoding step per position: the trace (default 1..n, left to right), pads max + 1."""
    trace = np.arange(1, response_tokens + 1) if trace is None else np.asarray(trace, np.int64)
    if trace.shape != (response_tokens,):
        raise ValueError(f"trace has {trace.shape} entries for a response of {response_tokens} tokens")
    steps = np.full(response_length, (int(trace.max()) + 1) if response_tokens else 1, np.int64)
    steps[:response_tokens] = trace
    return steps


def _tail_untrained(response_tokens: int, response_length: int, post_num: int) -> tuple[np.ndarray, np.ndarray]:
    trainable = trainable_pads(np.zeros(response_tokens), response_length, post_num)
    tail = np.arange(response_length) >= response_tokens
    return trainable, tail & ~trainable


def semi_ar_masks(
    response_tokens: int,
    response_length: int,
    *,
    block_size: int,
    lower_p: float,
    upper_p: float,
    post_num: int,
    rng: np.random.Generator,
    trace: np.ndarray | None = None,
) -> Masks:
    """Semi-AR (sliced) SFT of Dream/LLaDA: one row per response block that has trainable tokens.

    Blocks are `block_size` consecutive positions, or, with a `trace`, groups of `block_size`
    consecutive distinct decoding steps (the original's `collapse_k_unique(step_map, block_size)`).
    In row i, block i's positions are masked with p_j ~ U(lower_p, upper_p) each (at least one),
    later blocks are fully masked and earlier ones clean.
    """
    if trace is None:
        group = np.arange(response_length) // block_size
    else:
        shrunk = shrink_steps(padded_steps(trace, response_tokens, response_length), block_size)
        group = np.unique(shrunk, return_inverse=True)[1].reshape(-1)
    trainable, always_masked = _tail_untrained(response_tokens, response_length, post_num)
    rows = []
    for i in np.unique(group):
        in_block = group == i
        candidates = in_block & trainable
        if not candidates.any():
            continue
        probs = rng.uniform(lower_p, upper_p, size=response_length)
        masked = in_block & (rng.uniform(size=response_length) < probs)
        if not (masked & trainable).any():  # never an empty row
            masked[rng.choice(np.flatnonzero(candidates))] = True
        noisy = masked | (group > i) | always_masked
        rows.append((noisy, masked & trainable))
    return rows


def random_masking_masks(
    response_tokens: int,
    response_length: int,
    *,
    times: int,
    lower_p: float,
    upper_p: float,
    post_num: int,
    rng: np.random.Generator,
) -> Masks:
    """`times` rows, each masking every response position with one probability t ~ U(lower_p, upper_p)."""
    trainable, always_masked = _tail_untrained(response_tokens, response_length, post_num)
    if not trainable.any():
        return []
    rows = []
    for _ in range(times):
        t = rng.uniform(lower_p, upper_p)
        masked = (rng.uniform(size=response_length) < t) & trainable
        if not masked.any():
            masked[rng.choice(np.flatnonzero(trainable))] = True
        rows.append((masked | always_masked, masked))
    return rows


def full_trace_masks(
    trace: np.ndarray | None,
    response_tokens: int,
    response_length: int,
    *,
    shrink: int,
    post_num: int,
) -> Masks:
    """Full-attention trace rows (spec 3.10): the steps over the whole response are shrunk by
    `shrink`; for each distinct value v the input masks steps >= v and the loss takes steps == v."""
    trace = np.arange(1, response_tokens + 1) if trace is None else np.asarray(trace)
    # One training block spanning the response: the per-block rounds become whole-response rounds.
    rounds = trace_rounds(trace, response_tokens, response_length=response_length, prompt_length=0,
                          block_size=response_length, shrink=shrink, post_num=post_num,
                          alignment=BlockAlignment.ORIGINAL)
    return [(r.noisy, r.trained) for r in rounds]

"""Which response positions a training row masks and which it trains (spec sections 3.3, 3.10, 4, 5).

Every builder maps one response (its length, and for trace rows the sampler's trace) to boolean
arrays of the padded response length L1: `noisy` (replaced by the mask token in the noisy copy) and
`trained` (p_mask, the positions in the loss). SFT and RL share them; `training/rows.py` lays the
masks out as rows.

* `random_mask`: every position masked with its own p_j ~ U(lower_p, upper_p) (block SFT, the
  original's `semi-ar`; random-masking and coupled RL).
* `random_masking_masks`: rows that each mask with one t ~ U(lower_p, upper_p) (LLaDA/Dream SFT).
* `semi_ar_masks`: one row per response block (LLaDA/Dream semi-AR SFT).
* `trace_rounds`: one row per (shrunk) decoding round of the sampler's trace (TraceRL, trace SFT);
  `full_trace_masks` is its single-block form for full-attention models.

Positions past the response are pads with step max + 1 (`padded_steps`, the original's
convention); only the first `post_num` of them are trained (`trainable_positions`).

Trace rows, kept from the original: a generated EOS that equals the pad id (TraDo/SDAR:
<|endoftext|>) counts as the first pad, so with `post_num = 0` it is never trained (spec 3.3).
Fixed (spec section 10): traces stay aligned with their own tokens (no re-tokenisation, no drop
shift); training blocks are aligned as at inference unless `BlockAlignment.ORIGINAL` is asked for.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tradojax.ops.masks import BlockAlignment

Masks = list[tuple[np.ndarray, np.ndarray]]  # (noisy, trained) per row


@dataclasses.dataclass(frozen=True)
class TraceRound:
    """One training row of one response."""

    noisy: np.ndarray  # [L1] bool: masked in the noisy copy
    trained: np.ndarray  # [L1] bool: p_mask, the tokens this row trains
    steps: np.ndarray  # [L1] int: the (shrunk) step of every response position


def trainable_positions(response_tokens: int, response_length: int, post_num: int,
                        ends_with_pad: bool = False) -> np.ndarray:
    """[L1] bool: the response tokens that are not pads, then the first `post_num` pads (a final
    EOS equal to the pad id is the first of them: the original's `input_ids == pad_id` filter)."""
    real = response_tokens - (1 if ends_with_pad and response_tokens else 0)
    keep = np.zeros(response_length, bool)
    keep[: min(real + post_num, response_length)] = True
    return keep


def padded_steps(trace: np.ndarray | None, response_tokens: int, response_length: int) -> np.ndarray:
    """[L1] int64 decoding step per position: the trace (default 1..n, left to right), then the
    pads at max + 1 (1 for an empty response)."""
    trace = np.arange(1, response_tokens + 1) if trace is None else np.asarray(trace, np.int64)
    if trace.shape != (response_tokens,):
        raise ValueError(f"trace has {trace.shape} entries for a response of {response_tokens} tokens")
    if response_tokens > response_length:
        raise ValueError(f"response of {response_tokens} tokens exceeds response_length={response_length}")
    steps = np.full(response_length, (int(trace.max()) + 1) if response_tokens else 1, np.int64)
    steps[:response_tokens] = trace
    return steps


def shrink_steps(steps: np.ndarray, shrink: int) -> np.ndarray:
    """Maps each step to the largest of its group of `shrink` consecutive distinct steps
    (`u_i -> u_min(ceil(i/s)*s, m)`, 1-based i)."""
    if shrink < 1:
        raise ValueError(f"shrink must be >= 1, got {shrink}")
    if shrink == 1 or steps.size == 0:
        return steps.copy()
    distinct = np.unique(steps)
    group_end = np.minimum((np.arange(len(distinct)) // shrink + 1) * shrink, len(distinct)) - 1
    lookup = dict(zip(distinct.tolist(), distinct[group_end].tolist()))
    return np.array([lookup[s] for s in steps.tolist()], dtype=steps.dtype)


def response_blocks(response_length: int, prompt_length: int, block_size: int,
                    alignment: BlockAlignment) -> np.ndarray:
    """[L1] training block id of every response position."""
    offsets = np.arange(response_length)
    if alignment is BlockAlignment.ORIGINAL:
        return offsets // block_size
    return (prompt_length + offsets) // block_size


# ----------------------------------------------------------------------------------------------
# Random masks
# ----------------------------------------------------------------------------------------------


def random_mask(response_tokens: int, response_length: int, *, lower_p: float, upper_p: float, post_num: int,
                rng: np.random.Generator, ends_with_pad: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, trained): every position masked independently with p_j ~ U(lower_p, upper_p);
    masked trainable positions carry loss. A row with something trainable never trains nothing:
    one trainable position is then masked."""
    trainable = trainable_positions(response_tokens, response_length, post_num, ends_with_pad)
    probs = rng.uniform(lower_p, upper_p, size=response_length)
    masked = rng.uniform(size=response_length) < probs
    if not (masked & trainable).any() and trainable.any():
        masked[rng.choice(np.flatnonzero(trainable))] = True
    return masked, masked & trainable


def _tail_untrained(response_tokens: int, response_length: int, post_num: int) -> tuple[np.ndarray, np.ndarray]:
    """(trainable, always masked): pads past `post_num` are masked in the input and never trained
    (the original's LLaDA/Dream rule: at inference the model never sees the pads after a response)."""
    trainable = trainable_positions(response_tokens, response_length, post_num)
    tail = np.arange(response_length) >= response_tokens
    return trainable, tail & ~trainable


def random_masking_masks(response_tokens: int, response_length: int, *, times: int, lower_p: float, upper_p: float,
                         post_num: int, rng: np.random.Generator) -> Masks:
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


def semi_ar_masks(response_tokens: int, response_length: int, *, block_size: int, lower_p: float, upper_p: float,
                  post_num: int, rng: np.random.Generator, trace: np.ndarray | None = None) -> Masks:
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


# ----------------------------------------------------------------------------------------------
# Trace rows
# ----------------------------------------------------------------------------------------------


def trace_rounds(
    trace: np.ndarray,
    response_tokens: int,
    *,
    response_length: int,
    prompt_length: int,
    block_size: int,
    shrink: int = 1,
    post_num: int = 0,
    alignment: BlockAlignment = BlockAlignment.INFERENCE,
    ends_with_pad: bool = False,
) -> list[TraceRound]:
    """The TraceRL rows of one response.

    Inside each training block the distinct steps are optionally shrunk (groups of `shrink`
    consecutive steps merged); round k trains, in every block at once, the tokens unmasked at that
    block's k-th step: the noisy copy masks the block's tokens of that step and later ones, earlier
    rounds' tokens stay clean, and finished blocks are fully clean.

    Args:
      trace: [n] the 1-based step of each generated token (n = response_tokens, EOS included).
      response_length: L1, the padded length; pads are trained only for the first `post_num`.
      prompt_length: P, the real prompt length (block alignment at inference).
      ends_with_pad: the last generated token is the pad id (an EOS equal to pad): it keeps its
        own step in the noisy copies but counts as the first pad for `post_num`.
    """
    steps = padded_steps(trace, response_tokens, response_length)
    if response_tokens and steps[:response_tokens].min() < 1:
        raise ValueError("trace steps are 1-based: found a step < 1")
    blocks = response_blocks(response_length, prompt_length, block_size, alignment)
    for block in np.unique(blocks):
        in_block = blocks == block
        steps[in_block] = shrink_steps(steps[in_block], shrink)
    trainable = trainable_positions(response_tokens, response_length, post_num, ends_with_pad)

    rounds = []
    remaining = np.ones(response_length, bool)
    while remaining.any():
        noisy = np.zeros(response_length, bool)
        current = np.zeros(response_length, bool)
        for block in np.unique(blocks[remaining]):
            in_block = blocks == block
            first = steps[in_block & remaining].min()
            noisy |= in_block & (steps >= first)
            current |= in_block & remaining & (steps == first)
        remaining &= ~current
        trained = current & trainable
        if trained.any():
            rounds.append(TraceRound(noisy=noisy, trained=trained, steps=steps.copy()))
    return rounds


def full_trace_masks(trace: np.ndarray | None, response_tokens: int, response_length: int, *, shrink: int,
                     post_num: int) -> Masks:
    """Full-attention trace rows (spec 3.10): the steps over the whole response are shrunk by
    `shrink`; for each distinct value v the input masks steps >= v and the loss takes steps == v."""
    trace = np.arange(1, response_tokens + 1) if trace is None else np.asarray(trace)
    # One training block spanning the response: the per-block rounds become whole-response rounds.
    rounds = trace_rounds(trace, response_tokens, response_length=response_length, prompt_length=0,
                          block_size=response_length, shrink=shrink, post_num=post_num,
                          alignment=BlockAlignment.ORIGINAL)
    return [(r.noisy, r.trained) for r in rounds]

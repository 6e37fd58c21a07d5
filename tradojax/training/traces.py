"""From the sampler's trace to TraceRL training rows (spec section 3.3).

Input per response: its token ids (as generated: never re-tokenised) and its trace, the global
1-based denoising step at which each token was unmasked. Inside each training block the distinct
steps are optionally shrunk (groups of `shrink` consecutive steps are merged), and round k of the
response trains, in every block at once, the tokens unmasked at that block's k-th step: the noisy
copy masks the block's tokens of that step and later ones, earlier rounds' tokens stay clean, and
finished blocks are fully clean.

Fixes of the original (spec section 10): traces stay aligned with their own tokens and rewards
(no re-tokenisation, no drop shift); training blocks are aligned as at inference unless
`BlockAlignment.ORIGINAL` is asked for.

Kept from the original: a generated EOS that equals the pad id (TraDo/SDAR: <|endoftext|>) counts as
the first pad, so with `post_num = 0` it is never trained (spec 3.3), and the outcome reward of the
value flow lands on the last step among the tokens before it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tradojax.ops.masks import BlockAlignment


@dataclasses.dataclass(frozen=True)
class TraceRound:
    """One training row of one response."""

    noisy: np.ndarray  # [L1] bool: masked in the noisy copy
    trained: np.ndarray  # [L1] bool: p_mask, the tokens this row trains
    steps: np.ndarray  # [L1] int: the (shrunk) step of every response position


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


def trainable_positions(response_tokens: int, response_length: int, post_num: int,
                        ends_with_pad: bool = False) -> np.ndarray:
    """[L1] bool: the response tokens that are not pads, then the first `post_num` pads (a final
    EOS equal to the pad id is the first of them: the original's `input_ids == pad_id` filter)."""
    real = response_tokens - (1 if ends_with_pad and response_tokens else 0)
    keep = np.zeros(response_length, bool)
    keep[: min(real + post_num, response_length)] = True
    return keep


def response_blocks(response_length: int, prompt_length: int, block_size: int,
                    alignment: BlockAlignment) -> np.ndarray:
    """[L1] training block id of every response position."""
    offsets = np.arange(response_length)
    if alignment is BlockAlignment.ORIGINAL:
        return offsets // block_size
    return (prompt_length + offsets) // block_size


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

    Args:
      trace: [n] the step of each generated token (n = response_tokens, EOS included if generated).
      response_length: L1, the padded length; positions past the response are pads with step
        max + 1 (the original's convention), trained only for the first `post_num` of them.
      prompt_length: P, the real prompt length (block alignment at inference).
      ends_with_pad: the last generated token is the pad id (an EOS equal to pad): it keeps its
        own step in the noisy copies but counts as the first pad for `post_num`.
    """
    trace = np.asarray(trace, np.int64)
    if trace.shape != (response_tokens,):
        raise ValueError(f"trace has {trace.shape} entries for a response of {response_tokens} tokens")
    if response_tokens > response_length:
        raise ValueError(f"response of {response_tokens} tokens exceeds response_length={response_length}")
    if response_tokens and trace.min() < 1:
        raise ValueError("trace steps are 1-based: found a step < 1")
    steps = np.full(response_length, (trace.max() + 1) if response_tokens else 1, np.int64)
    steps[:response_tokens] = trace
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

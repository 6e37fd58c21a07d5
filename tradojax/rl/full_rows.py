"""RL rows of full-attention models, LLaDA and Dream (spec sections 3.10 and 4).

The same contract as `rl/methods.py` (one response -> a list of `TraceRound`s), laid out
single-stream (`[prompt | noisy response]`, no clean copy) by the loop:

* `tracerl`: the response's steps are shrunk by `rl.shrink` over the **whole response** (one
  block spanning it); for each distinct shrunk step v one row masks steps >= v and trains steps == v;
* `random_masking`: `rl.mask_times_per_sample` rows, each masking every response token with one
  t ~ U(lower_p, upper_p);
* `coupled`: each of those rows plus its complement (the trainable tokens it left visible).

Pads past `post_num` are masked in every input and never trained; an EOS equal to the pad id
counts as the first pad (the original's `input_ids == pad_id` filter). The loss (per-row token
mean, KL summed) is chosen by the loop from the row layout (`rl/loop.py`, `policy_loss_fn`).
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from tradojax.ops.masks import BlockAlignment
from tradojax.training.row_masks import (TraceRound, padded_steps, random_masking_masks, trace_rounds,
                                         trainable_positions)


def full_tracerl_rows(trace, response_tokens, *, response_length, shrink, post_num, ends_with_pad=False,
                      **_unused) -> list[TraceRound]:
    """TraceRL with shrinkage over the whole response (spec 3.10): the block rounds of
    `trace_rounds` with one training block spanning the response."""
    return trace_rounds(trace, response_tokens, response_length=response_length, prompt_length=0,
                        block_size=response_length, shrink=shrink, post_num=post_num,
                        alignment=BlockAlignment.ORIGINAL, ends_with_pad=ends_with_pad)


def _random_rows(trace, response_tokens, *, response_length, post_num, lower_p, upper_p, rng, times,
                 ends_with_pad, coupled) -> list[TraceRound]:
    # an EOS equal to the pad id is the first pad: it falls in the always-masked, untrained tail
    real = response_tokens - (1 if ends_with_pad and response_tokens else 0)
    steps = padded_steps(trace, response_tokens, response_length)
    rows = []
    for noisy, trained in random_masking_masks(real, response_length, times=times, lower_p=lower_p,
                                               upper_p=upper_p, post_num=post_num, rng=rng):
        rows.append(TraceRound(noisy=noisy, trained=trained, steps=steps))
        if coupled:
            trainable = trainable_positions(real, response_length, post_num)
            always_masked = (np.arange(response_length) >= real) & ~trainable  # pads past post_num
            complement = trainable & ~trained
            if complement.any():
                rows.append(TraceRound(noisy=complement | always_masked, trained=complement, steps=steps))
    return rows


def full_random_masking_rows(trace, response_tokens, *, response_length, post_num, lower_p, upper_p, rng, times,
                             ends_with_pad=False, **_unused) -> list[TraceRound]:
    """`times` rows (spec 4, LLaDA/Dream): each masks the response with one t ~ U(lower_p, upper_p)."""
    return _random_rows(trace, response_tokens, response_length=response_length, post_num=post_num,
                        lower_p=lower_p, upper_p=upper_p, rng=rng, times=times, ends_with_pad=ends_with_pad,
                        coupled=False)


def full_coupled_rows(trace, response_tokens, *, response_length, post_num, lower_p, upper_p, rng, times,
                      ends_with_pad=False, **_unused) -> list[TraceRound]:
    """Each random row followed by its complement: up to 2 x `times` rows, each draw training every
    trainable token exactly once."""
    return _random_rows(trace, response_tokens, response_length=response_length, post_num=post_num,
                        lower_p=lower_p, upper_p=upper_p, rng=rng, times=times, ends_with_pad=ends_with_pad,
                        coupled=True)


FULL_METHODS: dict[str, Callable[..., list[TraceRound]]] = {
    "tracerl": full_tracerl_rows,
    "random_masking": full_random_masking_rows,
    "coupled": full_coupled_rows,
}


def full_row_builder(name: str, mask_times_per_sample: int) -> Callable[..., list[TraceRound]]:
    """The builder of `rl.method` for full-attention rows, taking `rl/methods.py`'s arguments."""
    try:
        builder = FULL_METHODS[name]
    except KeyError:
        raise ValueError(f"rl.method: unknown method {name!r} (known: {sorted(FULL_METHODS)})") from None
    return functools.partial(builder, times=mask_times_per_sample)

"""RL methods differ only in how a response becomes training rows (spec sections 3.3 and 4).

Each builder maps one response to a list of `TraceRound`s (noisy positions, trained positions,
per-position steps); the loop, losses and metrics are shared. Choose with `rl.method`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from tradojax.ops.masks import BlockAlignment
from tradojax.training.traces import TraceRound, trace_rounds, trainable_positions


def tracerl_rows(trace, response_tokens, *, response_length, prompt_length, block_size, shrink, post_num,
                 alignment, lower_p, upper_p, rng, ends_with_pad=False) -> list[TraceRound]:
    """TraceRL: one row per (shrunk) decoding round, following the sampler's own order."""
    del lower_p, upper_p, rng
    return trace_rounds(trace, response_tokens, response_length=response_length, prompt_length=prompt_length,
                        block_size=block_size, shrink=shrink, post_num=post_num, alignment=alignment,
                        ends_with_pad=ends_with_pad)


def _random_mask(response_tokens, response_length, post_num, lower_p, upper_p, rng, ends_with_pad):
    trainable = trainable_positions(response_tokens, response_length, post_num, ends_with_pad)
    probs = rng.uniform(lower_p, upper_p, size=response_length)
    masked = rng.uniform(size=response_length) < probs
    if not (masked & trainable).any() and trainable.any():
        masked[rng.choice(np.flatnonzero(trainable))] = True
    return masked, trainable


def _steps(trace, response_tokens, response_length):
    steps = np.full(response_length, (int(np.max(trace)) + 1) if response_tokens else 1, np.int64)
    steps[:response_tokens] = trace
    return steps


def random_masking_rows(trace, response_tokens, *, response_length, prompt_length, block_size, shrink, post_num,
                        alignment, lower_p, upper_p, rng, ends_with_pad=False) -> list[TraceRound]:
    """One row: every position masked with probability p_j ~ U(lower_p, upper_p)."""
    masked, trainable = _random_mask(response_tokens, response_length, post_num, lower_p, upper_p, rng,
                                     ends_with_pad)
    return [TraceRound(noisy=masked, trained=masked & trainable, steps=_steps(trace, response_tokens, response_length))]


def coupled_rows(trace, response_tokens, *, response_length, prompt_length, block_size, shrink, post_num,
                 alignment, lower_p, upper_p, rng, ends_with_pad=False) -> list[TraceRound]:
    """The random row plus its complement: every trainable token is trained exactly once."""
    masked, trainable = _random_mask(response_tokens, response_length, post_num, lower_p, upper_p, rng,
                                     ends_with_pad)
    steps = _steps(trace, response_tokens, response_length)
    rows = [TraceRound(noisy=masked, trained=masked & trainable, steps=steps)]
    complement = ~masked
    if (complement & trainable).any():
        rows.append(TraceRound(noisy=complement, trained=complement & trainable, steps=steps))
    return rows


METHODS: dict[str, Callable[..., list[TraceRound]]] = {
    "tracerl": tracerl_rows,
    "random_masking": random_masking_rows,
    "coupled": coupled_rows,
}


def row_builder(name: str) -> Callable[..., list[TraceRound]]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"rl.method: unknown method {name!r} (known: {sorted(METHODS)})") from None

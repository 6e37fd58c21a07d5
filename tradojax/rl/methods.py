"""RL methods differ only in how a response becomes training rows (spec sections 3.3 and 4).

Each builder maps one response to a list of `TraceRound`s (noisy positions, trained positions,
per-position steps); the loop, losses and metrics are shared. Choose with `rl.method`.
"""

from __future__ import annotations

from typing import Callable

from tradojax.training.row_masks import TraceRound, padded_steps, random_mask, trace_rounds, trainable_positions


def tracerl_rows(trace, response_tokens, *, response_length, prompt_length, block_size, shrink, post_num,
                 alignment, lower_p, upper_p, rng, ends_with_pad=False) -> list[TraceRound]:
    """TraceRL: one row per (shrunk) decoding round, following the sampler's own order."""
    del lower_p, upper_p, rng
    return trace_rounds(trace, response_tokens, response_length=response_length, prompt_length=prompt_length,
                        block_size=block_size, shrink=shrink, post_num=post_num, alignment=alignment,
                        ends_with_pad=ends_with_pad)


def random_masking_rows(trace, response_tokens, *, response_length, prompt_length, block_size, shrink, post_num,
                        alignment, lower_p, upper_p, rng, ends_with_pad=False) -> list[TraceRound]:
    """One row: every position masked with probability p_j ~ U(lower_p, upper_p)."""
    noisy, trained = random_mask(response_tokens, response_length, lower_p=lower_p, upper_p=upper_p,
                                 post_num=post_num, rng=rng, ends_with_pad=ends_with_pad)
    return [TraceRound(noisy=noisy, trained=trained, steps=padded_steps(trace, response_tokens, response_length))]


def coupled_rows(trace, response_tokens, *, response_length, prompt_length, block_size, shrink, post_num,
                 alignment, lower_p, upper_p, rng, ends_with_pad=False) -> list[TraceRound]:
    """The random row plus its complement: every trainable token is trained exactly once."""
    noisy, trained = random_mask(response_tokens, response_length, lower_p=lower_p, upper_p=upper_p,
                                 post_num=post_num, rng=rng, ends_with_pad=ends_with_pad)
    steps = padded_steps(trace, response_tokens, response_length)
    rows = [TraceRound(noisy=noisy, trained=trained, steps=steps)]
    complement = ~noisy
    trainable = trainable_positions(response_tokens, response_length, post_num, ends_with_pad)
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

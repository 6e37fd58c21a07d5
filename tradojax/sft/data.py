"""SFT examples as token ids: from an SFT data file, or from the built-in synthetic math tasks.

Files hold `{prompt, response[, step_map]}` records (.json list, .jsonl or .parquet; spec 5 and 7):
prompts are already chat-templated and responses end with the end-of-turn text. Prompt and
response are tokenised separately, so the boundary is exact. A `step_map` (the decoding step of
every response token) becomes the pair's trace for trace SFT; the original's 0-based step maps
are shifted to 1-based, and a step map whose length differs from the tokenised response (text
re-tokenised differently, spec bug 6) is truncated or padded with max + 1 as the original does,
with a count in the log. Every error names the file, the record and the field.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from tradojax.config import Config
from tradojax.data.readers import DataFormatError, MathTask, iter_raw_records, sft_example_from_dict
from tradojax.data.synthetic import synthetic_math_splits, synthetic_solution
from tradojax.data.templates import encode_sft_example, encode_text, end_of_turn_text, llada_prompt, math_prompt
from tradojax.sft.trainer import SFTPair
from tradojax.training.row_masks import padded_steps


def _check_ids(ids: tuple[int, ...], vocab_size: int | None, field: str, file: str, location: str) -> None:
    if not ids:
        raise DataFormatError("tokenises to no tokens", file=file, location=location, field=field)
    if vocab_size is not None and max(ids) >= vocab_size:
        raise DataFormatError(f"token id {max(ids)} is outside the model's vocabulary (vocab_size={vocab_size}); "
                              "does config.tokenizer match the model?", file=file, location=location, field=field)


def _trace_from_step_map(step_map: tuple[int, ...], response_tokens: int, file: str,
                         location: str) -> tuple[tuple[int, ...], bool]:
    """(1-based trace of `response_tokens` entries, whether the length had to be adjusted)."""
    steps = np.asarray(step_map, np.int64)
    if steps.size == 0:
        raise DataFormatError("is empty", file=file, location=location, field="step_map")
    if steps.min() < 0:
        raise DataFormatError(f"decoding steps must be >= 0, found {int(steps.min())}", file=file,
                              location=location, field="step_map")
    if steps.min() == 0:  # the original writes 0-based history indices
        steps = steps + 1
    adjusted = len(steps) != response_tokens
    if len(steps) > response_tokens:
        steps = steps[:response_tokens]
    elif len(steps) < response_tokens:  # the missing tail decodes after the recorded steps
        steps = padded_steps(steps, len(steps), response_tokens)
    return tuple(int(s) for s in steps), adjusted


def load_sft_pairs(path: str | os.PathLike, tokenizer: Any, *, vocab_size: int | None = None,
                   log: Callable[[str], None] = print) -> list[SFTPair]:
    """Reads and tokenises an SFT data file; DataFormatError names file, record and field."""
    file = str(path)
    pairs, adjusted = [], []
    for location, record in iter_raw_records(path):
        example = sft_example_from_dict(record, file=file, location=location)
        prompt, response = encode_sft_example(tokenizer, example)
        _check_ids(prompt, vocab_size, "prompt", file, location)
        _check_ids(response, vocab_size, "response", file, location)
        trace = None
        if example.step_map is not None:
            trace, changed = _trace_from_step_map(example.step_map, len(response), file, location)
            if changed:
                adjusted.append(location)
        pairs.append(SFTPair(prompt, response, trace))
    if not pairs:
        raise DataFormatError("holds no SFT records", file=file)
    if adjusted:
        log(f"{file}: {len(adjusted)} step_map(s) did not match the tokenised response length and were "
            f"truncated or padded (first: {adjusted[0]})")
    return pairs


def synthetic_sft_pairs(num_examples: int, config: Config, tokenizer: Any) -> tuple[list[SFTPair], list[MathTask]]:
    """(training pairs, disjoint held-out tasks) from the built-in synthetic math tasks.

    Each pair is the task's math prompt (the LLaDA template for llada models) and its worked
    solution plus the end-of-turn text; the held-out tasks (`data.synthetic_eval_size` of them)
    serve held-out losses and sampling evals.
    """
    data = config.data
    train_tasks, held_out = synthetic_math_splits(num_examples, data.synthetic_eval_size, data.seed,
                                                  data.synthetic_difficulty)
    return [synthetic_pair(task, config, tokenizer) for task in train_tasks], held_out


def synthetic_pair(task: MathTask, config: Config, tokenizer: Any) -> SFTPair:
    """One synthetic task as an SFT pair (prompt template by model family)."""
    if config.model.family == "llada":
        prompt = llada_prompt(tokenizer, task.question)
    else:
        prompt = math_prompt(tokenizer, task.question, start_with_think=config.data.start_with_think)
    response = encode_text(tokenizer, synthetic_solution(task) + end_of_turn_text(tokenizer))
    return SFTPair(tuple(prompt.token_ids), tuple(response))

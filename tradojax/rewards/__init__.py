"""Verified rewards: math answer checking, sandboxed code execution, and a host process pool.

Entry point for RL and evaluation::

    from tradojax.rewards import RewardPool, score_responses

    with RewardPool(num_workers=8) as pool:
        results = score_responses(items, responses, kind="math", pool=pool,
                                  response_lengths=lengths, max_tokens=1024)
        # or, overlapped with device work:
        batch = pool.submit_batch("code", items, responses)
        ...
        results = batch.result()

Each `RewardResult` carries ``score`` (math: 1.0/0.0; code: the number of passed tests, the
original's partial credit), ``correct`` (math: equivalent and not truncated; code: every test
passed), a human-readable ``reason`` and ``details``.

Tasks are `tradojax.data`'s `MathTask` / `CodeTask` records (or their JSON dicts).
Modules: `tradojax.rewards.math` (extraction and equivalence, pure), `tradojax.rewards.code`
(program extraction and test running), `tradojax.rewards.sandbox` (process isolation),
`tradojax.rewards.pool` (the process pool and `score_responses`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RewardResult:
    """The verdict on one response.

    Attributes:
        score: the reward before group normalisation (math 1.0/0.0, code: tests passed).
        correct: whether the response counts as solved (for accuracy).
        reason: a short human-readable explanation.
        details: extra facts (extracted answer, per-test verdicts, sandbox layers, ...).
    """

    score: float
    correct: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


# Defined before the submodules are imported: they import RewardResult from here.
from tradojax.rewards.code import (  # noqa: E402
    extract_program,
    parse_code_task,
    score_code,
)
from tradojax.rewards.math import (  # noqa: E402
    NO_ANSWER,
    answers_match,
    extract_boxed_answer,
    normalize_answer,
    parse_math_task,
    score_math,
)
from tradojax.rewards.pool import RewardBatch, RewardPool, score_responses  # noqa: E402
from tradojax.rewards.sandbox import ExecutionReport, SandboxLimits, TestVerdict  # noqa: E402

__all__ = [
    "ExecutionReport",
    "NO_ANSWER",
    "RewardBatch",
    "RewardPool",
    "RewardResult",
    "SandboxLimits",
    "TestVerdict",
    "answers_match",
    "extract_boxed_answer",
    "extract_program",
    "normalize_answer",
    "parse_code_task",
    "parse_math_task",
    "score_code",
    "score_math",
    "score_responses",
]

"""Built-in synthetic verifiable math tasks for the demo and tests.

Arithmetic kinds, each with difficulty 1 (easiest) to 5: multi-digit ``addition``, ``subtraction``,
``multiplication`` and ``linear_equation`` (solve for an integer x); and structural kinds whose rule
generalises to unseen operands even for a tiny model: ``maximum`` (the largest of a list) and
``reverse`` (a digit string backwards). Questions and answers are short
(a tiny model with ~128 tokens of context can learn them), answers are integer strings that the math
verifiers accept, and generation is deterministic for a given seed. Each task's ``extra`` records the
kind, difficulty, operands and a short worked ``solution`` ending in ``\\boxed{answer}`` (SFT target).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from tradojax.data.readers import MathTask
from tradojax.data.templates import (
    CODE_FUNCTION_INSTRUCTION,
    CODE_STDIO_INSTRUCTION,
    MATH_COT_INSTRUCTION,
    QWEN_END_OF_TURN,
    THINK_MATH_INSTRUCTION,
    render_user_turn,
)

SYNTHETIC_KINDS: tuple[str, ...] = ("addition", "subtraction", "multiplication", "linear_equation")
# Structural kinds whose rule generalises to unseen operands (the CPU demo's model learns them).
STRUCTURAL_KINDS: tuple[str, ...] = ("maximum", "reverse")
MIN_DIFFICULTY, MAX_DIFFICULTY = 1, 5


def _uniform_digits(rng: np.random.Generator, digits: int) -> int:
    """A non-negative integer with at most `digits` digits (0 included)."""
    return int(rng.integers(0, 10**digits))


def _signed_term(first: bool, sign: int, value: int) -> str:
    if first:
        return f"-{value}" if sign < 0 else f"{value}"
    return f"- {value}" if sign < 0 else f"+ {value}"


def _addition(rng: np.random.Generator, difficulty: int) -> tuple[str, int, list[int]]:
    digits, terms = {1: (1, 2), 2: (2, 2), 3: (3, 2), 4: (3, 3), 5: (4, 3)}[difficulty]
    operands = [_uniform_digits(rng, digits) for _ in range(terms)]
    expression = " + ".join(str(v) for v in operands)
    return expression, sum(operands), operands


def _subtraction(rng: np.random.Generator, difficulty: int) -> tuple[str, int, list[int]]:
    # Easy levels keep the result non-negative; harder ones allow negative results and 3 terms.
    digits, terms, allow_negative = {1: (1, 2, False), 2: (2, 2, False), 3: (3, 2, True), 4: (3, 3, True), 5: (4, 3, True)}[
        difficulty
    ]
    operands = [_uniform_digits(rng, digits) for _ in range(terms)]
    if not allow_negative:
        operands = sorted(operands, reverse=True)
    expression = " - ".join(str(v) for v in operands)
    return expression, operands[0] - sum(operands[1:]), operands


def _multiplication(rng: np.random.Generator, difficulty: int) -> tuple[str, int, list[int]]:
    left_digits, right_digits = {1: (1, 1), 2: (2, 1), 3: (2, 2), 4: (3, 2), 5: (3, 3)}[difficulty]
    operands = [_uniform_digits(rng, left_digits), _uniform_digits(rng, right_digits)]
    return f"{operands[0]} * {operands[1]}", operands[0] * operands[1], operands


def _linear_side(coefficient: int, constant: int) -> str:
    """`coefficient*x + constant` written the usual way (1x -> x, +- constants, no 0 terms)."""
    if coefficient == 0:
        return str(constant)
    x_term = {1: "x", -1: "-x"}.get(coefficient, f"{coefficient}x")
    if constant == 0:
        return x_term
    return f"{x_term} {_signed_term(False, int(np.sign(constant)), abs(constant))}"


def _linear_equation(rng: np.random.Generator, difficulty: int) -> tuple[str, int, list[int]]:
    """Integer x; level 1: x + b = c, 2: ax + b = c, 3: negatives, 4-5: unknown on both sides."""
    if difficulty == 1:
        x, a, c_coef = int(rng.integers(0, 10)), 1, 0
        b = int(rng.integers(1, 10))
    elif difficulty == 2:
        x, a, c_coef = int(rng.integers(0, 10)), int(rng.integers(2, 10)), 0
        b = int(rng.integers(0, 10))
    elif difficulty == 3:
        x, a, c_coef = int(rng.integers(-9, 10)), int(rng.choice([-1, 1])) * int(rng.integers(2, 10)), 0
        b = int(rng.integers(-20, 21))
    else:
        bound_x, bound_coef = (20, 9) if difficulty == 4 else (50, 20)
        x = int(rng.integers(-bound_x, bound_x + 1))
        a = int(rng.integers(-bound_coef, bound_coef + 1))
        c_coef = int(rng.integers(-bound_coef, bound_coef + 1))
        while c_coef == a or a == 0 or c_coef == 0:  # a unique solution, x on both sides
            a = int(rng.integers(-bound_coef, bound_coef + 1))
            c_coef = int(rng.integers(-bound_coef, bound_coef + 1))
        b = int(rng.integers(-bound_x, bound_x + 1))
    d = a * x + b - c_coef * x
    left, right = _linear_side(a, b), _linear_side(c_coef, d)
    return f"{left} = {right}", x, [a, b, c_coef, d]


def _maximum(rng: np.random.Generator, difficulty: int) -> tuple[str, int, list[int]]:
    count, digits = {1: (3, 1), 2: (4, 1), 3: (5, 2), 4: (6, 2), 5: (8, 3)}[difficulty]
    operands = [_uniform_digits(rng, digits) for _ in range(count)]
    return ", ".join(str(v) for v in operands), max(operands), operands


def _reverse(rng: np.random.Generator, difficulty: int) -> tuple[str, int, list[int]]:
    count = {1: 3, 2: 4, 3: 5, 4: 6, 5: 7}[difficulty]
    digits = [int(d) for d in rng.integers(1, 10, size=count)]  # no 0: the answer reads as a number
    return " ".join(str(d) for d in digits), int("".join(str(d) for d in reversed(digits))), digits


_GENERATORS: dict[str, Callable[[np.random.Generator, int], tuple[str, int, list[int]]]] = {
    "maximum": _maximum,
    "reverse": _reverse,
    "addition": _addition,
    "subtraction": _subtraction,
    "multiplication": _multiplication,
    "linear_equation": _linear_equation,
}


def _make_task(kind: str, difficulty: int, rng: np.random.Generator) -> MathTask:
    expression, answer, operands = _GENERATORS[kind](rng, difficulty)
    if kind == "linear_equation":
        question = f"Solve for x: {expression}"
        solution = f"x = {answer}\n\\boxed{{{answer}}}"
    elif kind == "maximum":
        question = f"What is the largest of {expression}?"
        solution = f"max({expression}) = {answer}\n\\boxed{{{answer}}}"
    elif kind == "reverse":
        question = f"Reverse the digits {expression}"
        solution = f"{' '.join(reversed(expression.split()))}\n\\boxed{{{answer}}}"
    else:
        question = f"What is {expression}?"
        solution = f"{expression} = {answer}\n\\boxed{{{answer}}}"
    return MathTask(
        question=question,
        ground_truth_answer=str(answer),
        extra={"kind": kind, "difficulty": difficulty, "operands": operands, "solution": solution},
    )


def _validate(difficulty: int | Sequence[int], kinds: Sequence[str] | None) -> tuple[tuple[int, ...], tuple[str, ...]]:
    levels = (difficulty,) if isinstance(difficulty, (int, np.integer)) else tuple(difficulty)
    if not levels or any(
        isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not MIN_DIFFICULTY <= d <= MAX_DIFFICULTY
        for d in levels
    ):
        raise ValueError(f"difficulty must be an int (or ints) in [{MIN_DIFFICULTY}, {MAX_DIFFICULTY}], got {difficulty!r}")
    chosen = SYNTHETIC_KINDS if kinds is None else tuple(kinds)
    unknown = [k for k in chosen if k not in _GENERATORS]
    if not chosen or unknown:
        raise ValueError(f"kinds must be a non-empty subset of {tuple(_GENERATORS)}, got {kinds!r}")
    return tuple(int(d) for d in levels), chosen


def synthetic_math_tasks(
    n: int,
    seed: int,
    difficulty: int | Sequence[int] = 1,
    *,
    kinds: Sequence[str] | None = None,
    unique: bool = True,
) -> list[MathTask]:
    """``n`` synthetic tasks, deterministic in ``seed``.

    Each task draws its kind uniformly from ``kinds`` (default all four) and its level uniformly from
    ``difficulty`` (one level or several). With ``unique=True`` no two tasks share a question; a
    ValueError says so when the requested levels cannot supply ``n`` distinct questions.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    levels, chosen_kinds = _validate(difficulty, kinds)
    rng = np.random.default_rng([int(seed), 0x5EED])
    tasks: list[MathTask] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 50 * n + 1000
    last_new = 0  # the draw that found the latest new question
    while len(tasks) < n:
        # Far more draws than questions found without a new one: the levels are exhausted (fail now,
        # not after 50 * n draws).
        if attempts >= max_attempts or (unique and attempts - last_new > 10 * len(seen) + 1000):
            raise ValueError(
                f"found only {len(tasks)} distinct questions for kinds={chosen_kinds} difficulty={levels} "
                f"after {attempts} draws; ask for fewer than {n} tasks or raise the difficulty"
            )
        attempts += 1
        kind = chosen_kinds[int(rng.integers(len(chosen_kinds)))]
        level = levels[int(rng.integers(len(levels)))]
        task = _make_task(kind, level, rng)
        if unique:
            if task.question in seen:
                continue
            seen.add(task.question)
            last_new = attempts
        tasks.append(task)
    return tasks


def split_train_heldout(
    tasks: Sequence[MathTask], heldout: int | float, seed: int
) -> tuple[list[MathTask], list[MathTask]]:
    """Split tasks into (train, held-out) with no question in both; duplicates are dropped first.

    ``heldout`` is a count, or a fraction in (0, 1) of the distinct questions.
    """
    distinct: dict[str, MathTask] = {}
    for task in tasks:
        distinct.setdefault(task.question, task)
    unique_tasks = list(distinct.values())
    if isinstance(heldout, float):
        if not 0.0 < heldout < 1.0:
            raise ValueError(f"a held-out fraction must be in (0, 1), got {heldout}")
        count = max(1, round(heldout * len(unique_tasks)))
    else:
        count = int(heldout)
    if not 0 <= count <= len(unique_tasks):
        raise ValueError(f"held-out size {count} is out of range for {len(unique_tasks)} distinct tasks")
    order = np.random.default_rng([int(seed), 0x5B17]).permutation(len(unique_tasks))
    held = sorted(order[:count].tolist())
    held_set = set(held)
    train = [unique_tasks[i] for i in range(len(unique_tasks)) if i not in held_set]
    return train, [unique_tasks[i] for i in held]


def synthetic_math_splits(
    n_train: int,
    n_heldout: int,
    seed: int,
    difficulty: int | Sequence[int] = 1,
    *,
    kinds: Sequence[str] | None = None,
) -> tuple[list[MathTask], list[MathTask]]:
    """Disjoint (train, held-out) synthetic task lists of the given sizes."""
    tasks = synthetic_math_tasks(n_train + n_heldout, seed, difficulty, kinds=kinds, unique=True)
    return split_train_heldout(tasks, n_heldout, seed)


def synthetic_solution(task: MathTask) -> str:
    """The short worked solution (ends in ``\\boxed{answer}``) of a synthetic task."""
    try:
        return str(task.extra["solution"])
    except KeyError as err:
        raise ValueError(f"task {task.question!r} is not a synthetic task (no 'solution' in extra)") from err


def synthetic_tokenizer_corpus(tasks: Sequence[MathTask]) -> list[str]:
    """Training text for a tiny tokenizer: each task's math prompt (ChatML) + solution + end of turn,
    plus the other prompt instructions so that their words get merges too."""
    corpus = [
        render_user_turn(None, task.question + MATH_COT_INSTRUCTION) + synthetic_solution(task) + QWEN_END_OF_TURN
        for task in tasks
    ]
    corpus += [THINK_MATH_INSTRUCTION, CODE_FUNCTION_INSTRUCTION, CODE_STDIO_INSTRUCTION] * 4
    return corpus

"""Synthetic verifiable math tasks: determinism, correct answers, difficulty, splits, and size."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest

from tradojax.data.synthetic import (
    SYNTHETIC_KINDS,
    split_train_heldout,
    synthetic_math_splits,
    synthetic_math_tasks,
    synthetic_solution,
)

_ARITHMETIC = re.compile(r"^What is (-?\d+(?: [-+*] \d+)+)\?$")
_EQUATION = re.compile(r"^Solve for x: (.+) = (.+)$")
_SIDE = re.compile(r"^(?:(-?\d*)x)?(?:\s*([+-])?\s*(\d+))?$")


def _evaluate_arithmetic(expression: str) -> int:
    """Left-to-right evaluation with * binding tighter, from the question text alone."""
    tokens = expression.split()
    terms = [int(tokens[0])]
    signs = [1]
    for op, value in zip(tokens[1::2], tokens[2::2]):
        if op == "*":
            terms[-1] *= int(value)
        else:
            terms.append(int(value))
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms))


def _linear_side(text: str) -> tuple[int, int]:
    """(coefficient of x, constant) of one side such as '-3x + 7', 'x', '-12'."""
    text = text.strip()
    if "x" not in text:
        return 0, int(text)
    match = _SIDE.match(text)
    assert match, text
    coefficient = {"": 1, "-": -1}.get(match.group(1), None)
    coefficient = int(match.group(1)) if coefficient is None else coefficient
    constant = 0 if match.group(3) is None else int(match.group(3)) * (-1 if match.group(2) == "-" else 1)
    return coefficient, constant


def _solve_from_question(question: str) -> Fraction:
    arithmetic = _ARITHMETIC.match(question)
    if arithmetic:
        return Fraction(_evaluate_arithmetic(arithmetic.group(1)))
    equation = _EQUATION.match(question)
    assert equation, f"unrecognised question {question!r}"
    (a, b), (c, d) = _linear_side(equation.group(1)), _linear_side(equation.group(2))
    assert a != c
    return Fraction(d - b, a - c)


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_answers_are_correct_when_recomputed_from_the_question(difficulty):
    tasks = synthetic_math_tasks(120, seed=difficulty, difficulty=difficulty)
    assert {t.extra["kind"] for t in tasks} == set(SYNTHETIC_KINDS)
    for task in tasks:
        solved = _solve_from_question(task.question)
        assert solved.denominator == 1 and str(solved.numerator) == task.ground_truth_answer, task.question
        assert synthetic_solution(task).endswith(f"\\boxed{{{task.ground_truth_answer}}}")


def test_deterministic_in_seed_and_unique():
    a = synthetic_math_tasks(200, seed=3, difficulty=[2, 3])
    b = synthetic_math_tasks(200, seed=3, difficulty=[2, 3])
    assert [(t.question, t.ground_truth_answer, t.extra) for t in a] == [(t.question, t.ground_truth_answer, t.extra) for t in b]
    assert [t.question for t in synthetic_math_tasks(200, seed=4, difficulty=[2, 3])] != [t.question for t in a]
    assert len({t.question for t in a}) == 200
    assert {t.extra["difficulty"] for t in a} == {2, 3}


def test_difficulty_controls_operand_size():
    def largest(kind: str, difficulty: int) -> int:
        tasks = synthetic_math_tasks(150, seed=0, difficulty=difficulty, kinds=[kind], unique=False)
        return max(abs(v) for t in tasks for v in t.extra["operands"])

    for kind in ("addition", "multiplication"):
        sizes = [largest(kind, d) for d in (1, 3, 5)]
        assert sizes[0] <= 9 < sizes[1] < sizes[2]
    subtraction_answers = [int(t.ground_truth_answer) for t in synthetic_math_tasks(100, 0, 2, kinds=["subtraction"])]
    assert min(subtraction_answers) >= 0  # easy levels never go negative
    hard_equations = synthetic_math_tasks(100, 0, 5, kinds=["linear_equation"])
    assert all(t.question.removeprefix("Solve for x: ").count("x") == 2 for t in hard_equations)


def test_train_and_heldout_never_overlap():
    train, held = synthetic_math_splits(300, 60, seed=9, difficulty=[1, 2])
    assert (len(train), len(held)) == (300, 60)
    assert {t.question for t in train}.isdisjoint({t.question for t in held})
    # Splitting a list with duplicates drops them first, so no question lands on both sides.
    duplicated = synthetic_math_tasks(200, seed=1, difficulty=1, unique=False)
    assert len({t.question for t in duplicated}) < 200
    train, held = split_train_heldout(duplicated, 0.2, seed=0)
    assert {t.question for t in train}.isdisjoint({t.question for t in held})
    assert len(train) + len(held) == len({t.question for t in duplicated})
    assert split_train_heldout(duplicated, 0.2, seed=0) == (train, held)


def test_answers_pass_math_verify():
    from math_verify import parse, verify

    for task in synthetic_math_tasks(12, seed=2, difficulty=[3, 4, 5]):
        gold = parse(f"${task.ground_truth_answer}$")
        assert verify(gold, parse(synthetic_solution(task)))
        assert not verify(gold, parse(f"\\boxed{{{int(task.ground_truth_answer) + 1}}}"))


def test_prompt_and_solution_fit_a_tiny_context(tokenizer):
    from tradojax.data.templates import math_prompt

    tasks = synthetic_math_tasks(100, seed=0, difficulty=[1, 2, 3, 4, 5])
    longest = max(
        len(math_prompt(tokenizer, t.question)) + len(tokenizer.encode(synthetic_solution(t) + "<|im_end|>", add_special_tokens=False))
        for t in tasks
    )
    assert longest <= 96


def test_invalid_arguments():
    with pytest.raises(ValueError, match="difficulty"):
        synthetic_math_tasks(5, seed=0, difficulty=6)
    with pytest.raises(ValueError, match="kinds"):
        synthetic_math_tasks(5, seed=0, kinds=["division"])
    with pytest.raises(ValueError, match="distinct questions"):
        synthetic_math_tasks(150, seed=0, difficulty=1, kinds=["addition"])  # only 100 exist
    with pytest.raises(ValueError, match="out of range"):
        split_train_heldout(synthetic_math_tasks(10, seed=0), 11, seed=0)


def test_structural_kinds_have_exact_answers_and_worked_solutions():
    from tradojax.data.synthetic import synthetic_math_tasks, synthetic_solution

    tasks = synthetic_math_tasks(40, 3, 2, kinds=["maximum", "reverse"])
    assert {t.extra["kind"] for t in tasks} == {"maximum", "reverse"}
    for task in tasks:
        operands = task.extra["operands"]
        if task.extra["kind"] == "maximum":
            assert len(operands) == 4 and task.ground_truth_answer == str(max(operands))
        else:
            assert len(operands) == 4 and 0 not in operands
            assert task.ground_truth_answer == "".join(str(d) for d in reversed(operands))
        assert synthetic_solution(task).endswith(f"\\boxed{{{task.ground_truth_answer}}}")

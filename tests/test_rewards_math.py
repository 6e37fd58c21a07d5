"""Math reward: boxed-answer extraction, answer equivalence, truncation rule, pathological input."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from tradojax.rewards import RewardResult
from tradojax.rewards.math import (
    NO_ANSWER,
    answers_match,
    extract_boxed_answer,
    normalize_answer,
    parse_math_task,
    score_math,
)

# (prediction, ground truth): equivalent.
EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{3}{4}", "\\frac{3}{4}"),
    ("\\tfrac{3}{4}", "0.75"),
    ("\\frac34", "\\frac{3}{4}"),
    ("3/4", "\\frac{3}{4}"),
    ("0.25", "\\frac{1}{4}"),
    ("10", "10\\text{ cm}"),
    ("10 \\text{cm}", "10"),
    ("5\\,\\text{m}^2", "5"),
    ("12 inches", "12"),
    ("8\\text{ cm}^2", "8"),
    ("20 \\text{ dollars}", "\\$20"),
    ("90^\\circ", "90"),
    ("90", "90^{\\circ}"),
    ("45\u00b0", "45"),
    ("x = 3", "3"),
    ("3", "x=3"),
    ("k = 5", "5"),
    ("y = 2x+1", "2x+1"),
    ("(1, 2]", "(1,2]"),
    ("[0, \\infty)", "[0,\\infty)"),
    ("(-\\infty, 3) \\cup (5, \\infty)", "(-\\infty,3)\\cup(5,\\infty)"),
    ("x \\in [1, 2]", "[1,2]"),
    ("(3, -4)", "(3,-4)"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("(1,2,3)", "(1, 2, 3)"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "(1,2)"),
    ("\\{1, 2\\}", "\\{2,1\\}"),
    ("50\\%", "50"),
    ("50", "50\\%"),
    ("25%", "25\\%"),
    ("10\\%", "0.1"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("\\sqrt2", "\\sqrt{2}"),
    ("\\sqrt{12}", "2\\sqrt{3}"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}"),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"),
    ("-5", "-5"),
    ("-\\frac{1}{2}", "\\frac{-1}{2}"),
    ("\\frac{-3}{4}", "-0.75"),
    ("-.25", "-\\frac{1}{4}"),
    ("\u22123", "-3"),
    ("1.5", "\\frac{3}{2}"),
    ("3.0", "3"),
    ("1.20", "1.2"),
    (".5", "\\frac12"),
    ("0.3333333333", "\\frac{1}{3}"),
    ("0.\\overline{3}", "\\frac{1}{3}"),
    ("1\\frac{1}{2}", "\\frac{3}{2}"),
    ("1,000", "1000"),
    ("\\$25", "25"),
    ("\\text{(B)}", "B"),
    ("(C)", "C"),
    ("\\mathrm{(D)}", "D"),
    ("\\textbf{Yes}", "yes"),
    ("2^{10}", "1024"),
    ("2 \\pi", "2\\pi"),
    ("6.283185307179586", "2\\pi"),
    ("\\frac{9\\pi}{4}", "\\frac{9}{4}\\pi"),
    ("3+2x", "2x+3"),
    ("(x+1)^2", "x^2+2x+1"),
]

# (prediction, ground truth): not equivalent.
DIFFERENT = [
    ("\\frac{1}{3}", "0.333"),
    ("\\frac{2}{3}", "0.6"),
    ("\\sqrt{2}", "1.414"),
    ("3.0001", "3"),
    ("-5", "5"),
    ("-0.5", "0.5"),
    ("12", "13"),
    ("50", "5"),
    ("1000", "1,000,000"),
    ("1,2", "12"),
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("(1,2)", "(2,1)"),
    ("(1,2,3)", "(1,3,2)"),
    ("(1,2)", "[1,2]"),
    ("(-\\infty,0]", "(-\\infty,0)"),
    ("[1,3]", "[1,2]"),
    ("\\{1,2\\}", "\\{1,2,3\\}"),
    ("\\infty", "-\\infty"),
    ("2x-3", "2x+3"),
    ("x^2", "2x"),
    ("2x", "2"),
    ("4\\sqrt{2}", "2\\sqrt{2}"),
    ("3\\sqrt{3}", "\\sqrt{3}"),
    ("10\\%", "1"),
    ("45^\\circ", "135^\\circ"),
    ("x = 4", "3"),
    ("A", "B"),
    ("\\text{Tuesday}", "Wednesday"),
    ("\\text{east}", "west"),
    ("", "3"),
]


@pytest.mark.parametrize(("prediction", "truth"), EQUIVALENT)
def test_equivalent_answers_match(prediction: str, truth: str) -> None:
    verdict, method = answers_match(prediction, truth)
    assert verdict, f"{prediction!r} vs {truth!r}: {method}"


@pytest.mark.parametrize(("prediction", "truth"), DIFFERENT)
def test_different_answers_do_not_match(prediction: str, truth: str) -> None:
    verdict, method = answers_match(prediction, truth)
    assert not verdict, f"{prediction!r} vs {truth!r}: {method}"


def test_table_is_large_and_balanced() -> None:
    assert len(EQUIVALENT) + len(DIFFERENT) >= 60
    assert len(DIFFERENT) >= 25


@pytest.mark.parametrize(("raw", "normal"), [
    ("\\dfrac12", "\\frac{1}{2}"),
    ("\\left(1,2\\right)", "(1,2)"),
    ("x = -7", "-7"),
    ("1,234,567", "1234567"),
    ("0.1\\overline{6}", "\\frac{1}{6}"),
    ("\\text{ Yes }", "yes"),
    ("15^{\\circ}", "15"),
    ("7/8", "\\frac{7}{8}"),
    ("\\begin{bmatrix}1 & 2\\end{bmatrix}", "(1,2)"),
    ("100.00", "100"),
])
def test_normalize_answer_canonical_forms(raw: str, normal: str) -> None:
    assert normalize_answer(raw) == normal


# -- extraction --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{3}}{\\left(2\\right)}}", "\\frac{\\sqrt{3}}{\\left(2\\right)}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{1} and finally \\fbox{7}", "7"),
    ("\\fbox{x^{2}} and \\boxed{y_{1}}", "y_{1}"),
    ("the set \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{\\left\\{ x \\right.}", "\\left\\{ x \\right."),
    ("answer: \\boxed 42$", "42"),
    ("\\boxed{  3  }", "3"),
    ("$\\boxed{\\text{(A)}}$", "\\text{(A)}"),
])
def test_extract_boxed_answer(text: str, expected: str) -> None:
    assert extract_boxed_answer(text) == expected


@pytest.mark.parametrize("text", [
    "no box at all, the answer is 5",
    "\\boxed{\\frac{1}{2}",  # unbalanced: never closes
    "\\boxed{1} but then \\boxed{2",  # the last box decides, and it is unbalanced
    "\\boxed",
    "\\boxedtext{3}",  # a different macro
])
def test_extract_boxed_answer_fallback(text: str) -> None:
    assert extract_boxed_answer(text) is None


def test_extract_rejects_non_string() -> None:
    with pytest.raises(TypeError, match="text must be a str"):
        extract_boxed_answer(None)  # type: ignore[arg-type]


# -- score_math --------------------------------------------------------------------------------


def test_score_math_correct_and_wrong() -> None:
    good = score_math("We get $\\boxed{\\dfrac{1}{2}}$.", "0.5")
    assert isinstance(good, RewardResult)
    assert (good.score, good.correct) == (1.0, True)
    assert good.details["extracted"] == "\\dfrac{1}{2}"
    bad = score_math("We get $\\boxed{3}$.", "4")
    assert (bad.score, bad.correct) == (0.0, False)
    assert "'3'" in bad.reason and bad.details["raw_correct"] is False


def test_score_math_missing_and_unbalanced_box() -> None:
    none = score_math("The answer is 4.", "4")
    assert none.score == 0.0 and "no \\boxed answer" in none.reason
    assert none.details["extracted"] == NO_ANSWER
    unbalanced = score_math("The answer is \\boxed{4", "4")
    assert unbalanced.score == 0.0 and "unbalanced" in unbalanced.reason


@pytest.mark.parametrize(("length", "max_tokens", "expected"), [
    (94, 100, 1.0),  # below max - 5
    (95, 100, 0.0),  # == max - 5: truncated
    (100, 100, 0.0),
    (2000, None, 1.0),  # no limit given: no penalty
])
def test_truncation_rule(length: int, max_tokens: int | None, expected: float) -> None:
    result = score_math("\\boxed{7}", "7", response_length=length, max_tokens=max_tokens)
    assert result.score == expected
    assert result.correct is (expected == 1.0)
    # The original logs accuracy before the penalty: the raw verdict is kept.
    assert result.details["raw_correct"] is True
    assert result.details["truncated"] is (expected == 0.0)
    if expected == 0.0:
        assert "truncated" in result.reason


def test_score_math_off_main_thread() -> None:
    # math-verify's signal timeouts only work in the main thread; off it they must be disabled.
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        results = list(executor.map(lambda args: score_math(*args), [
            ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"), ("\\boxed{x^2+2x+1}", "(x+1)^2"),
            ("\\boxed{3}", "\\sqrt{8}")]))
    assert [r.score for r in results] == [1.0, 1.0, 0.0]
    assert "math-verify" in results[0].reason


def test_parse_math_task_errors_name_the_field() -> None:
    assert parse_math_task({"question": "q", "ground_truth_answer": "3"}) == "3"
    assert parse_math_task({"ground_truth_answer": 3}) == "3"
    with pytest.raises(ValueError, match="item 4: missing field 'ground_truth_answer'"):
        parse_math_task({"question": "q"}, "item 4")
    with pytest.raises(ValueError, match="'ground_truth_answer' must be a string"):
        parse_math_task({"ground_truth_answer": ["3"]})
    with pytest.raises(ValueError, match="must be a dict"):
        parse_math_task("3")


# -- pathological input (direct call; the pool's hard limit is tested in test_reward_pool) -----

PATHOLOGICAL = {
    "deep_parens": "\\boxed{" + "(" * 300 + "1" + ")" * 300 + "}",
    "deep_fracs": "\\boxed{" + "\\frac{1}{" * 60 + "2" + "}" * 60 + "}",
    "deep_braces_unbalanced": "\\boxed{" + "{" * 500_000,
    "megabyte_prefix": "x = y + 1. " * 100_000 + "\\boxed{\\frac{1}{2}}",
    "megabyte_answer": "\\boxed{" + "1+" * 500_000 + "1}",
    "many_boxes": "\\boxed{1}" * 100_000,
    "long_sum": "\\boxed{" + "1+" * 300 + "1}",
    "huge_exponent": "\\boxed{1e999999999}",
}


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_pathological_latex_is_fast(name: str) -> None:
    budget = 2.0
    start = time.monotonic()
    result = score_math(PATHOLOGICAL[name], "\\frac{1}{2}", time_budget_s=budget)
    elapsed = time.monotonic() - start
    assert elapsed < budget + 3.0, f"{name} took {elapsed:.1f} s"
    assert result.score == (1.0 if name == "megabyte_prefix" else 0.0), result.reason

"""Math rewards: final-answer extraction and equivalence checking (spec 6.1 and 3.2).

* `extract_boxed_answer` takes the content of the **last** ``\\boxed{...}`` or ``\\fbox{...}``
  (brace-depth matching, escaped ``\\{``/``\\}`` ignored; ``\\boxed 5`` accepted). As in the
  original, a missing box or unbalanced braces in the last box gives no answer
  (`NO_ANSWER`, "Can not extract the answer!"), which never matches.
* `answers_match(prediction, ground_truth)` decides equivalence in stages: equality after
  `normalize_answer` (this module's own normaliser: ``\\dfrac``/``\\tfrac``, ``\\left``/``\\right``,
  degrees, units, ``$``, ``\\%``, thousands separators, ``x = 3`` -> ``3``, ``\\frac12``,
  ``\\sqrt2``, ``a/b``, repeating decimals ``0.\\overline{3}``, vectors in ``pmatrix``, unicode
  symbols, text wrappers), then exact numeric equality of the normalised strings, then
  ``math-verify`` on the raw strings and on the normalised ones (symbolic equality, intervals,
  sets, tuples, percentages, equations).
* `score_math` is the pure reward function: 1.0 when equivalent, else 0.0. The truncation
  rule of the original applies: ``response_length >= max_tokens - 5`` counts as wrong (the raw
  equivalence is kept in ``details["raw_correct"]`` for the logged accuracy, which the original
  computes before the penalty).

Time limits: math-verify enforces its own with ``signal.alarm``, which only works in the main
thread. Called from the main thread (as in the reward-pool workers) we pass it whole-second
timeouts from the time budget; from any other thread we pass ``None`` and the caller (the pool)
must enforce the limit. The budget covers math-verify's work (imported and warmed up once per
process, outside it); a budget that runs out is reported as "not shown equal within the budget",
not as "not equal". Everything before math-verify is linear in the length and nesting of both
strings; an answer or ground truth longer than ``max_answer_chars`` is not compared at all, and
either nested deeper than ``max_nesting`` is compared by normalised string only, which keeps
pathological LaTeX from stalling the parser.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from fractions import Fraction
from typing import Any, Mapping

from tradojax.data.readers import MathTask
from tradojax.rewards import RewardResult

NO_ANSWER = "Can not extract the answer!"
TRUNCATION_MARGIN = 5  # the original's `response_length >= max_token - 5` rule

_BOX_COMMANDS = ("\\boxed", "\\fbox")

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Task data
# --------------------------------------------------------------------------------------------


def parse_math_task(item: Mapping[str, Any] | MathTask, where: str = "item") -> str:
    """The ground truth of a `MathTask` (tradojax.data's), or of a math item dict
    ``{"question", "ground_truth_answer"}`` after validating it."""
    if isinstance(item, MathTask):
        return item.ground_truth_answer
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: a math item must be a dict, got {type(item).__name__}")
    if "ground_truth_answer" not in item:
        raise ValueError(f"{where}: missing field 'ground_truth_answer'")
    answer = item["ground_truth_answer"]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise ValueError(f"{where}: field 'ground_truth_answer' must be a string, "
                         f"got {type(answer).__name__}")
    return answer


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_BRACE_TOKEN = re.compile(r"\\\\|\\[{}]|[{}]")


def _matching_brace_end(text: str, open_index: int) -> int | None:
    """Index just past the brace matching ``text[open_index] == "{"``, or None if unbalanced."""
    depth = 0
    for match in _BRACE_TOKEN.finditer(text, open_index):
        token = match.group()
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if depth == 0:
                return match.end()
    return None


def extract_boxed_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``/``\\fbox{...}`` in `text`, or None.

    None when there is no box, or when the braces of the last box never close (the original's
    "Can not extract the answer!" fallback). ``\\boxed 42`` (no braces) yields ``42``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    start, command = -1, ""
    for candidate in _BOX_COMMANDS:
        position = text.rfind(candidate)
        # rfind may land on "\boxed" inside a longer macro name; skip those.
        while position >= 0 and text[position + len(candidate):position + len(candidate) + 1
                                      ].isalpha():
            position = text.rfind(candidate, 0, position)
        if position > start:
            start, command = position, candidate
    if start < 0:
        return None
    cursor = start + len(command)
    while cursor < len(text) and text[cursor] in " \t":
        cursor += 1
    if cursor < len(text) and text[cursor] == "{":
        end = _matching_brace_end(text, cursor)
        if end is None:
            return None
        return text[cursor + 1:end - 1].strip()
    if cursor > start + len(command):  # "\boxed 42": up to the next "$" or whitespace
        match = re.match(r"[^\s$]+", text[cursor:])
        return match.group().strip() if match else None
    return None


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

_UNICODE = {
    "\u2212": "-", "\u2013": "-", "\u2014": "-", "\u00b0": "", "\u03c0": "\\pi",
    "\u221e": "\\infty", "\u221a": "\\sqrt", "\u00d7": "\\times", "\u00b7": "\\cdot",
    "\u2264": "\\le", "\u2265": "\\ge", "\u2260": "\\ne", "\u00a0": " ", "\u2009": " ",
    "\u202f": " ", "\u2061": "",
}

# Unit words removed after a number. Bare single letters (m, s, g, l) only inside \text{...}:
# "2m" may well be an expression in m.
_UNIT_WORDS = (
    "mm|cm|km|meters?|metres?|centimeters?|millimeters?|kilometers?|in|inch|inches|ft|feet|"
    "foot|yd|yards?|mi|miles?|units?|sq|square|cubic|degrees?|radians?|dollars?|cents?|"
    "hours?|hrs?|minutes?|mins?|seconds?|secs?|days?|weeks?|months?|years?|kg|grams?|"
    "kilograms?|lbs?|pounds?|ounces?|oz|liters?|litres?|ml|mph|kph|km/h|m/s|people|persons?|"
    "students?|times|ways|points?|percent|marbles|apples|books|boxes|coins|pages|cookies|"
    "candies|tickets|cars|balls|eggs"
)
_TRAILING_UNIT = re.compile(
    r"^(?P<value>.*?[\d}).])(?:\s*\\(?:text|mbox|mathrm|textrm)\s*\{\s*(?:" + _UNIT_WORDS +
    r"|m|s|g|l)\s*\}|\s+(?:" + _UNIT_WORDS + r"))(?:\s*\^\s*\{?[23]\}?)?$",
    re.IGNORECASE,
)
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*"
                           r"\{([^{}]*)\}")
_MAX_EXACT_DIGITS = 400  # exact Fractions beyond this many digits are not worth building
# Real answers nest \text at most a few deep; a fixed pass count keeps deeper input linear.
_MAX_UNWRAP_PASSES = 8
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SHORT_ASSIGNMENT = re.compile(r"^\s*[A-Za-z](?:_\{?\w\}?|\w)?\s*=\s*(?P<value>[^=]+)$")
_INT_FRACTION = re.compile(r"^(-?)(\d+)/(\d+)$")
_REPEATING = re.compile(r"^(-?)(\d*)\.(\d*)\\overline\{(\d+)\}$")
_VECTOR_ENV = re.compile(r"^\\begin\{([pbv]?matrix)\}(.*)\\end\{\1\}$", re.DOTALL)
# Unambiguous alternatives (no "\d+\.?\d*"): an ambiguous split backtracks quadratically.
_NUMBER = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?$", re.IGNORECASE)
_BRACED_FRACTION = re.compile(r"^(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}$")


def _fix_fracs(text: str) -> str:
    r"""``\frac12`` -> ``\frac{1}{2}``, ``\frac1{2}`` -> ``\frac{1}{2}``, ``\frac{1}2`` likewise."""
    text = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", text)
    text = re.sub(r"\\frac\s*(\{[^{}]*\})\s*(\d)", r"\\frac\1{\2}", text)
    return text


def _fix_sqrt(text: str) -> str:
    r"""``\sqrt2`` -> ``\sqrt{2}``, ``\sqrt x`` -> ``\sqrt{x}``."""
    return re.sub(r"\\sqrt\s*([0-9a-zA-Z])", r"\\sqrt{\1}", text)


def _repeating_decimal(match: re.Match) -> str:
    sign, whole, fixed, period = match.groups()
    base = Fraction(int(whole or "0")) + (Fraction(int(fixed), 10 ** len(fixed)) if fixed else 0)
    repeat = Fraction(int(period), (10 ** len(period) - 1) * 10 ** len(fixed))
    value = base + repeat
    if sign:
        value = -value
    return _fraction_latex(value)


def _fraction_latex(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def _brace_partners(text: str) -> dict[int, int]:
    """For every balanced ``{`` (escapes skipped as in `_matching_brace_end`): index -> end."""
    partners, open_indices = {}, []
    for match in _BRACE_TOKEN.finditer(text):
        token = match.group()
        if token == "{":
            open_indices.append(match.start())
        elif token == "}" and open_indices:
            partners[open_indices.pop()] = match.end()
    return partners


def _strip_outer_braces(text: str) -> str:
    """``{{ x }}`` -> ``x``: one pass over the braces, so linear in length and depth."""
    if not text.startswith("{"):
        return text
    partners = _brace_partners(text)
    start, end = 0, len(text)
    while start < end and text[start] == "{" and partners.get(start) == end:
        start, end = start + 1, end - 1
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
    return text[start:end]


def normalize_answer(answer: str) -> str:
    """Canonical string form of a final answer, for exact comparison (see module docstring)."""
    text = str(answer).strip()
    for old, new in _UNICODE.items():
        text = text.replace(old, new)
    text = text.replace("\n", " ").replace("\\!", "")
    vector = _VECTOR_ENV.match(text.strip())
    if vector:  # a row or column vector becomes a tuple
        cells = [c.strip() for row in re.split(r"\\\\", vector.group(2)) for c in row.split("&")]
        text = "(" + ",".join(c for c in cells if c) + ")"
    text = re.sub(r"\\\\(?=[A-Za-z])", r"\\", text)  # JSON-doubled backslashes before commands
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = re.sub(r"\\left\s*\.|\\right\s*\.", "", text)
    text = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])", "", text)
    text = re.sub(r"\\(?:displaystyle|textstyle)(?![A-Za-z])", "", text)
    text = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree", "", text)
    text = text.replace("\\$", "").replace("$", "")
    text = re.sub(r"(?<!\\)\\(?:[,;:]| )|~", " ", text)  # LaTeX spaces, not "\\ "
    text = re.sub(r"\\%|%|\\text\{\s*percent\s*\}", "", text)
    text = text.strip().rstrip(".").strip()
    # Trailing units ("5 cm", "5\text{ cm}^2") when something numeric precedes them.
    for _ in range(2):
        unit = _TRAILING_UNIT.match(text)
        if unit and unit.group("value").strip():
            text = unit.group("value").strip()
    text = re.sub(r"\\\\", r"\\", text)
    for _ in range(_MAX_UNWRAP_PASSES):  # unwrap nested \text{...}, innermost first
        unwrapped = _TEXT_WRAPPER.sub(r"\1", text)
        if unwrapped == text:
            break
        text = unwrapped
    text = text.strip()
    choice = re.fullmatch(r"\(\s*([A-Ea-e])\s*\)", text)
    if choice:
        text = choice.group(1).upper()
    assignment = _SHORT_ASSIGNMENT.match(text)
    if assignment and "," not in assignment.group("value"):
        text = assignment.group("value").strip()
    text = _strip_outer_braces(text)
    text = _fix_sqrt(_fix_fracs(text))
    text = re.sub(r"\s+", "", text)
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    text = re.sub(r"^(-?)\.(\d)", r"\g<1>0.\2", text)
    text = re.sub(r"(?<=\d)\.0+$", "", text) if _NUMBER.match(text) else text
    fraction = _INT_FRACTION.match(text)
    if fraction:
        text = f"{fraction.group(1)}\\frac{{{fraction.group(2)}}}{{{fraction.group(3)}}}"
    repeating = _REPEATING.match(text) if len(text) <= _MAX_EXACT_DIGITS else None
    if repeating:  # (longer: int() refuses over 4300 digits, and no real answer has them)
        text = _repeating_decimal(repeating)
    if re.fullmatch(r"[A-Za-z][A-Za-z ]*", text):
        text = text.lower()
    return text


def _as_number(text: str) -> Fraction | None:
    """Exact value of a normalised plain number or numeric ``\\frac``, else None."""
    if _NUMBER.match(text):
        exponent = re.search(r"e([-+]?\d+)$", text, re.IGNORECASE)
        if exponent and (len(exponent.group(1)) > 5
                         or abs(int(exponent.group(1))) > _MAX_EXACT_DIGITS):
            return None  # "1e999999999" would build a gigantic exact integer
        try:
            return Fraction(text)
        except (ValueError, ZeroDivisionError):
            return None
    fraction = _BRACED_FRACTION.match(text)
    if fraction:
        sign, numerator, denominator = fraction.groups()
        try:
            value = Fraction(numerator) / Fraction(denominator)
        except (ValueError, ZeroDivisionError):
            return None
        return -value if sign else value
    return None


# --------------------------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------------------------


def _nesting_depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        if char in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "})]":
            depth = max(0, depth - 1)
    return deepest


@functools.cache
def _math_verify() -> tuple[Any, Any, list, type[BaseException]]:
    """math-verify's parse, verify, extraction config and timeout exception, imported and warmed up
    once per process (the import and the first parse's grammar set-up take seconds: not any answer's
    time budget)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    main_thread = threading.current_thread() is threading.main_thread()
    parse("\\boxed{1}", extraction_config=config, parsing_timeout=30 if main_thread else None)
    return parse, verify, config, TimeoutException


def _math_verify_equal(gold: str, prediction: str, deadline: float) -> bool | None:
    """math-verify's verdict, or None when the time budget ran out before it could decide.

    math-verify swallows its own timeouts (a parse that times out reads as "nothing parsed",
    a comparison as "not equal"); with ``raise_on_error`` they reach us and count as undecided.
    Each (gold, prediction) parse pair is verified on its own so that one pair raising does not
    hide another that matches (as math-verify's own loop over the pairs does).
    """
    parse, verify, config, TimeoutException = _math_verify()
    in_main_thread = threading.current_thread() is threading.main_thread()

    def seconds_left() -> int | None:
        remaining = deadline - time.monotonic()
        if remaining < 0.5:
            raise TimeoutError
        # signal.alarm takes whole seconds; off the main thread the pool enforces the limit.
        return max(1, int(remaining)) if in_main_thread else None

    try:
        gold_parsed = parse("\\boxed{" + gold + "}", extraction_config=config,
                            parsing_timeout=seconds_left(), raise_on_error=True)
        pred_parsed = parse("\\boxed{" + prediction + "}", extraction_config=config,
                            parsing_timeout=seconds_left(), raise_on_error=True)
    except (TimeoutError, TimeoutException):
        return None
    except Exception:  # noqa: BLE001 - math-verify/sympy can raise almost anything
        logger.debug("math-verify could not parse %r or %r", prediction, gold, exc_info=True)
        return False
    timed_out = False
    for gold_item in gold_parsed:
        for pred_item in pred_parsed:
            try:
                if verify(gold_item, pred_item, timeout_seconds=seconds_left(),
                          raise_on_error=True):
                    return True
            except TimeoutError:
                return None  # the budget is spent: no pair left can be tried
            except TimeoutException:
                timed_out = True
            except Exception:  # noqa: BLE001
                logger.debug("math-verify failed on %r vs %r", prediction, gold, exc_info=True)
    return None if timed_out else False


TIMED_OUT = "not shown equal within the"  # start of the reason when the budget ran out


def answers_match(
    prediction: str | None,
    ground_truth: str,
    *,
    time_budget_s: float = 6.0,
    max_answer_chars: int = 1000,
    max_nesting: int = 24,
) -> tuple[bool, str]:
    """Whether an extracted answer equals the ground truth; returns (verdict, method/why).

    Linear in the length and nesting of both strings up to the symbolic stage; answers or
    ground truths longer than `max_answer_chars` are not compared at all, and either nested
    deeper than `max_nesting` is compared by normalised string only. When math-verify runs out
    of `time_budget_s` the reason starts with `TIMED_OUT` (undecided, not "not equal").
    """
    if prediction is None or prediction == NO_ANSWER:
        return False, "no answer extracted"
    if not prediction.strip():
        return False, "empty answer"
    if len(prediction) > max_answer_chars:
        return False, f"answer too long ({len(prediction)} > {max_answer_chars} characters)"
    if len(ground_truth) > max_answer_chars:
        return False, (f"ground truth too long ({len(ground_truth)} > {max_answer_chars} "
                       "characters): not compared")
    norm_pred, norm_truth = normalize_answer(prediction), normalize_answer(ground_truth)
    if norm_pred == norm_truth:
        return True, "equal after normalisation"
    value_pred, value_truth = _as_number(norm_pred), _as_number(norm_truth)
    if value_pred is not None and value_truth is not None and value_pred == value_truth:
        return True, "equal as numbers"
    if max(_nesting_depth(prediction), _nesting_depth(ground_truth)) > max_nesting:
        return False, f"not equal (nesting deeper than {max_nesting}: string comparison only)"
    attempts = [(ground_truth, prediction)]
    if (norm_truth, norm_pred) != (ground_truth, prediction) and norm_truth and norm_pred:
        attempts.append((norm_truth, norm_pred))
    _math_verify()  # (once per process, outside the budget)
    deadline = time.monotonic() + time_budget_s
    timed_out = False
    for gold, pred in attempts:
        verdict = _math_verify_equal(gold, pred, deadline)
        if verdict:
            return True, "equal by math-verify"
        timed_out = timed_out or verdict is None
    if timed_out:
        return False, f"{TIMED_OUT} {time_budget_s:g} s budget"
    return False, "not equal"


def score_math(
    response: str,
    ground_truth: str,
    *,
    response_length: int | None = None,
    max_tokens: int | None = None,
    time_budget_s: float = 6.0,
    max_answer_chars: int = 1000,
) -> RewardResult:
    """Reward of one math response: 1.0 if its last boxed answer equals `ground_truth`.

    Args:
        response: the decoded response text.
        ground_truth: the item's ``ground_truth_answer``.
        response_length: generated tokens; with `max_tokens`, applies the truncation rule
            (``response_length >= max_tokens - 5`` scores 0).
        max_tokens: the rollout's generation limit (``rollout.max_token``).
        time_budget_s: wall budget for the equivalence check (see module docstring).
        max_answer_chars: longer extracted answers score 0 without symbolic comparison.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    if not isinstance(ground_truth, str):
        raise TypeError(f"ground_truth must be a str, got {type(ground_truth).__name__}")
    started = time.monotonic()
    extracted = extract_boxed_answer(response)
    truncated = (response_length is not None and max_tokens is not None
                 and response_length >= max_tokens - TRUNCATION_MARGIN)
    if extracted is None:
        has_box = any(cmd in response for cmd in _BOX_COMMANDS)
        why = ("unbalanced braces in the last \\boxed" if has_box else "no \\boxed answer")
        equal, method = False, f"{why}: {NO_ANSWER}"
    else:
        equal, method = answers_match(extracted, ground_truth, time_budget_s=time_budget_s,
                                      max_answer_chars=max_answer_chars)
    details = {"extracted": extracted if extracted is not None else NO_ANSWER,
               "ground_truth": ground_truth, "method": method, "raw_correct": equal,
               "truncated": truncated, "timed_out": method.startswith(TIMED_OUT),
               "elapsed_s": round(time.monotonic() - started, 4)}
    if truncated:
        reason = (f"truncated: response_length {response_length} >= max_tokens - "
                  f"{TRUNCATION_MARGIN} = {max_tokens - TRUNCATION_MARGIN} (answer {method})")
        return RewardResult(0.0, False, reason, details)
    if equal:
        return RewardResult(1.0, True, f"correct: {method}", details)
    if extracted is None:
        return RewardResult(0.0, False, f"wrong: {method}", details)
    shown = extracted if len(extracted) <= 80 else extracted[:80] + "..."
    return RewardResult(0.0, False, f"wrong: {method} (answer {shown!r})", details)

"""Code rewards: program extraction (spec 6.2) and sandboxed test execution (spec 6.3, 3.2).

* `extract_program` takes the last fenced ``python`` block of the response (``py``/``python3``
  accepted, case-insensitive; an unterminated final block counts up to the end of the text).
  For ``function`` tasks the task's ``prefix`` is prepended to the response first, because the
  prompt ends with the prefix and the model continues it.
* `score_code` runs the program against the task's tests in `tradojax.rewards.sandbox`:
  ``function`` tasks execute each ``test_list`` assert in the program's namespace, ``stdio``
  tasks feed each ``test_input`` on stdin and compare the whitespace-normalised stdout with
  ``test_output``. The reward is **the number of passed tests** (the original's partial credit;
  the group z-score is applied later by RL), and ``correct`` means every test passed.

Timing (fixing spec 10 item 19): every test gets the task's ``test_time_limit`` (default 1 s)
of wall and CPU time measured from its own process start; interpreter start-up is not charged
to the program. The original charged stdio start-up to the program and gave a whole function
test list one shared budget of limit + 2 s.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any, Callable, Mapping

from tradojax.data.readers import CodeTask
from tradojax.rewards import RewardResult
from tradojax.rewards.sandbox import (
    ExecutionReport,
    SandboxLimits,
    function_phases,
    run_function_tests,
    run_stdio_tests,
)

DEFAULT_TEST_TIME_LIMIT_S = 1.0

_FENCE_OPEN = re.compile(r"```[ \t]*(?:python3?|py)\b[^\n]*\n", re.IGNORECASE)
_FENCE_CLOSE = re.compile(r"\n?[ \t]*```")


def _string_list(item: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    if key not in item:
        raise ValueError(f"{where}: missing field {key!r}")
    values = item[key]
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise ValueError(f"{where}: field {key!r} must be a list of strings, "
                         f"got {type(values).__name__}")
    out = []
    for index, value in enumerate(values):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ValueError(f"{where}: {key}[{index}] must be a string, "
                             f"got {type(value).__name__}")
        out.append(value)
    return tuple(out)


def parse_code_task(item: Mapping[str, Any] | CodeTask, where: str = "item") -> CodeTask:
    """A `CodeTask` (tradojax.data's) as is, or a code item dict validated into one; errors name
    the item (`where`) and the field. A dict needs no `question` (scoring does not read it)."""
    if isinstance(item, CodeTask):
        return item
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: a code item must be a dict, got {type(item).__name__}")
    method = item.get("test_method")
    if method not in ("function", "stdio"):
        raise ValueError(f"{where}: field 'test_method' must be 'function' or 'stdio', "
                         f"got {method!r}")
    limit = item.get("test_time_limit", DEFAULT_TEST_TIME_LIMIT_S)
    if limit is None:
        limit = DEFAULT_TEST_TIME_LIMIT_S
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
        raise ValueError(f"{where}: field 'test_time_limit' must be a positive number of "
                         f"seconds, got {limit!r}")
    prefix = item.get("prefix")
    if prefix is not None and not isinstance(prefix, str):
        raise ValueError(f"{where}: field 'prefix' must be a string, got {type(prefix).__name__}")
    question = item.get("question")
    question = question if isinstance(question, str) else ""
    if method == "function":
        tests = _string_list(item, "test_list", where)
        if not tests:
            raise ValueError(f"{where}: field 'test_list' is empty")
        return CodeTask(question, "function", float(limit), test_list=tests, prefix=prefix)
    inputs = _string_list(item, "test_input", where)
    outputs = _string_list(item, "test_output", where)
    if len(inputs) != len(outputs):
        raise ValueError(f"{where}: fields 'test_input' ({len(inputs)}) and 'test_output' "
                         f"({len(outputs)}) must have the same length")
    if not inputs:
        raise ValueError(f"{where}: field 'test_input' is empty")
    return CodeTask(question, "stdio", float(limit), test_input=inputs, test_output=outputs, prefix=prefix)


def extract_program(response: str, prefix: str | None = None) -> str | None:
    """The last ```python block of ``prefix + response``, dedented and stripped; None if absent."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    text = (prefix or "") + response
    program = None
    position = 0
    while True:
        opening = _FENCE_OPEN.search(text, position)
        if opening is None:
            break
        closing = _FENCE_CLOSE.search(text, opening.end())
        if closing is None:  # unterminated last block: take the rest
            program = text[opening.end():]
            break
        program = text[opening.end():closing.start()]
        position = closing.end()
    if program is None:
        return None
    program = textwrap.dedent(program).strip()
    return program or None


def code_time_budget(task: CodeTask, limits: SandboxLimits | None = None) -> float:
    """Upper bound of a sandboxed run's wall time (start-up + every test at its limit)."""
    limits = limits or SandboxLimits()
    phases = (function_phases(task.num_tests) if task.test_method == "function"
              else task.num_tests)
    return limits.startup_s + phases * (task.test_time_limit + 0.5) + 1.0


def score_code(
    item: Mapping[str, Any] | CodeTask,
    response: str,
    *,
    limits: SandboxLimits | None = None,
    on_runner_start: Callable[[int], None] | None = None,
) -> RewardResult:
    """Reward of one code response: the number of tests its program passes.

    Args:
        item: the task dict (see `parse_code_task`) or a parsed `CodeTask`.
        response: the decoded response text.
        limits: sandbox limits (memory, output, processes, isolation switch).
        on_runner_start: called with the sandbox runner's pid (pool supervision hook).
    """
    task = parse_code_task(item)
    program = extract_program(response, task.prefix if task.test_method == "function" else None)
    details: dict[str, Any] = {"passed": 0, "total": task.num_tests, "tests": []}
    if program is None:
        return RewardResult(0.0, False, "no ```python code block in the response", details)
    if task.test_method == "function":
        report = run_function_tests(program, list(task.test_list), task.test_time_limit, limits,
                                    on_runner_start)
    else:
        report = run_stdio_tests(program, list(task.test_input), list(task.test_output),
                                 task.test_time_limit, limits, on_runner_start)
    return _result_from_report(report, details)


def _result_from_report(report: ExecutionReport, details: dict[str, Any]) -> RewardResult:
    details.update(
        passed=report.passed,
        total=report.total,
        tests=[{"passed": v.passed, "reason": v.reason} for v in report.verdicts],
        sandbox=report.isolation,
        sandbox_degraded=list(report.degraded),
        wall_s=round(report.wall_s, 4),
    )
    if report.runner_error:
        details["runner_error"] = report.runner_error
    reason = f"passed {report.passed}/{report.total} tests"
    failures = [(k, v.reason) for k, v in enumerate(report.verdicts) if not v.passed]
    if failures:
        index, why = failures[0]
        reason += f"; test {index}: {why}"
    if report.degraded:
        reason += " [sandbox degraded: " + "; ".join(report.degraded) + "]"
    return RewardResult(float(report.passed), report.all_passed, reason, details)

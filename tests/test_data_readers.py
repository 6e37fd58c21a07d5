"""Readers for the dLLM-RL data formats (.json/.jsonl/.parquet) and the built-in HumanEval set."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tradojax.data.humaneval import HUMANEVAL_SIZE, humaneval_test_list, load_humaneval
from tradojax.data.readers import (
    CodeTask,
    DataFormatError,
    MathTask,
    SFTExample,
    read_code_tasks,
    read_math_tasks,
    read_records,
    read_sft_examples,
    write_records,
)

MATH_ROWS = [
    {"question": "What is 1 + 1?", "ground_truth_answer": "2", "source": "unit", "level": 1},
    {"question": "Solve $x^2 = 4$, x > 0.", "ground_truth_answer": "2"},
    {"question": "Numeric answer", "ground_truth_answer": 42},
]
CODE_ROWS = [
    {
        "question": "Write add(a, b).",
        "test_time_limit": 2,
        "test_method": "function",
        "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
        "prefix": "def add(a, b):\n",
    },
    {
        "question": "Read n and print 2n.",
        "test_method": "stdio",
        "test_input": ["1\n", "5\n"],
        "test_output": ["2", "10"],
        "difficulty": "easy",
    },
]
SFT_ROWS = [
    {"prompt": "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", "response": "a<|im_end|>"},
    {"prompt": "p", "response": "r", "step_map": [1, 1, 2]},
]


def _write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    else:
        # Columns over the union of keys (from_pylist would keep only the first row's keys).
        keys = list(dict.fromkeys(k for r in rows for k in r))
        pq.write_table(pa.table({k: [r.get(k) for r in rows] for k in keys}), path)
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_read_valid_files_in_every_format(tmp_path, suffix):
    # A parquet column has one type, so the numeric-answer row is a JSON-only case.
    math_rows = MATH_ROWS if suffix != ".parquet" else _mutated(MATH_ROWS, 2, ground_truth_answer="42")
    math_tasks = read_math_tasks(_write(tmp_path / f"math{suffix}", math_rows))
    assert [t.ground_truth_answer for t in math_tasks] == ["2", "2", "42"]
    assert math_tasks[0].extra == {"source": "unit", "level": 1}
    assert math_tasks[0].to_dict() == MATH_ROWS[0]

    function_task, stdio_task = read_code_tasks(_write(tmp_path / f"code{suffix}", CODE_ROWS))
    assert function_task == CodeTask(
        question="Write add(a, b).",
        test_method="function",
        test_time_limit=2.0,
        test_list=("assert add(1, 2) == 3", "assert add(-1, 1) == 0"),
        prefix="def add(a, b):\n",
    )
    assert stdio_task.test_time_limit == 1.0  # the original's default
    assert stdio_task.test_input == ("1\n", "5\n") and stdio_task.test_output == ("2", "10")
    assert (function_task.num_tests, stdio_task.num_tests) == (2, 2)
    assert stdio_task.extra == {"difficulty": "easy"}

    sft = read_sft_examples(_write(tmp_path / f"sft{suffix}", SFT_ROWS))
    assert sft[0] == SFTExample(prompt=SFT_ROWS[0]["prompt"], response="a<|im_end|>")
    assert sft[1].step_map == (1, 1, 2)


def test_write_then_read_round_trip(tmp_path):
    tasks = read_code_tasks(_write(tmp_path / "code.json", CODE_ROWS))
    for suffix in (".json", ".jsonl"):
        again = read_code_tasks(write_records(tmp_path / f"out{suffix}", tasks))
        assert again == tasks and [t.extra for t in again] == [t.extra for t in tasks]


def _mutated(rows: list[dict], index: int, **changes) -> list[dict]:
    rows = [dict(r) for r in rows]
    for key, value in changes.items():
        if value is _DELETE:
            del rows[index][key]
        else:
            rows[index][key] = value
    return rows


_DELETE = object()

MALFORMED = [
    # (name, data_type, rows, bad record index, field, message fragment)
    ("missing_question", "math", _mutated(MATH_ROWS, 1, question=_DELETE), 1, "question", "missing"),
    ("answer_is_list", "math", _mutated(MATH_ROWS, 2, ground_truth_answer=["2"]), 2, "ground_truth_answer", "expected a string"),
    ("question_is_number", "math", _mutated(MATH_ROWS, 0, question=7), 0, "question", "expected a string, got int"),
    ("unequal_stdio", "code", _mutated(CODE_ROWS, 1, test_output=["2"]), 1, "test_output", "test_input has 2"),
    ("bad_method", "code", _mutated(CODE_ROWS, 0, test_method="pytest"), 0, "test_method", "'function' or 'stdio'"),
    ("test_not_string", "code", _mutated(CODE_ROWS, 0, test_list=["assert True", 3]), 0, "test_list", "element 1"),
    ("no_tests", "code", _mutated(CODE_ROWS, 0, test_list=_DELETE), 0, "test_list", "missing"),
    ("bad_time_limit", "code", _mutated(CODE_ROWS, 1, test_time_limit=-1), 1, "test_time_limit", "positive number"),
    ("step_map_floats", "sft", _mutated(SFT_ROWS, 1, step_map=[1, 2.5]), 1, "step_map", "integer"),
    ("missing_response", "sft", _mutated(SFT_ROWS, 0, response=_DELETE), 0, "response", "missing"),
]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_records_name_file_location_and_field(tmp_path, suffix, case):
    name, data_type, rows, index, field, fragment = case
    path = _write(tmp_path / f"bad_{name}{suffix}", rows)
    location = f"line {index + 1}" if suffix == ".jsonl" else f"item {index}"
    with pytest.raises(DataFormatError) as info:
        read_records(path, data_type)
    message = str(info.value)
    assert path.name in message and location in message and f"'{field}'" in message and fragment in message
    assert (info.value.location, info.value.field) == (location, field)


def test_malformed_parquet_names_item_and_field(tmp_path):
    rows = _mutated(CODE_ROWS, 1, test_output=["2"])
    path = _write(tmp_path / "bad_code.parquet", rows)
    with pytest.raises(DataFormatError, match=r"bad_code\.parquet: item 1: field 'test_output'"):
        read_code_tasks(path)


def test_bad_json_syntax_and_structure(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(MATH_ROWS[0]) + "\n\n" + '{"question": "q", "ground_truth_answer": \n')
    with pytest.raises(DataFormatError, match=r"broken\.jsonl: line 3: invalid JSON"):
        read_math_tasks(path)
    path = tmp_path / "array_line.jsonl"
    path.write_text(json.dumps(MATH_ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataFormatError, match=r"array_line\.jsonl: line 2: expected a JSON object, got list"):
        read_math_tasks(path)
    path = tmp_path / "broken.json"
    path.write_text('[\n {"question": "q",\n  "ground_truth_answer": }\n]')
    with pytest.raises(DataFormatError, match=r"broken\.json: line 3: invalid JSON"):
        read_math_tasks(path)
    path = tmp_path / "dict.json"
    path.write_text(json.dumps({"question": "q"}))
    with pytest.raises(DataFormatError, match=r"dict\.json: expected a JSON list"):
        read_math_tasks(path)
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataFormatError, match=r"empty\.jsonl: contains no records"):
        read_math_tasks(path)
    with pytest.raises(DataFormatError, match=r"nowhere\.json: file does not exist"):
        read_math_tasks(tmp_path / "nowhere.json")
    path = tmp_path / "data.csv"
    path.write_text("question,answer\n")
    with pytest.raises(DataFormatError, match=r"data\.csv: unsupported file type '\.csv'"):
        read_math_tasks(path)


GOOD_LINE = json.dumps(MATH_ROWS[0]).encode() + b"\n"


@pytest.mark.parametrize("name, content, location", [
    # invalid UTF-8: the line, and the byte offset (in the line for JSONL, in the file for JSON)
    ("bad.jsonl", GOOD_LINE + b'{"question": "\xff\xfe", "ground_truth_answer": "1"}\n',
     r"bad\.jsonl: line 2: invalid UTF-8 at column 15 \(byte 14 of the line\)"),
    ("bad.json", b"[" + GOOD_LINE + b', {"question": "\xc3\x28", "ground_truth_answer": "1"}]',
     rf"bad\.json: line 2: invalid UTF-8 at byte {len(GOOD_LINE) + 17}"),  # 1 + line + 16
    # nesting past Python's recursion limit: a message, not a RecursionError
    ("deep.json", b"[" * 100_000 + b"]" * 100_000, r"deep\.json: line 1: JSON nested 100000 levels deep"),
    ("deep.jsonl", GOOD_LINE * 2 + b"[" * 100_000 + b"]" * 100_000 + b"\n",
     r"deep\.jsonl: line 3: JSON nested 100000 levels deep"),
    ("deep_field.jsonl", b'{"question": ' + b"[" * 50_000 + b"]" * 50_000 + b', "ground_truth_answer": "1"}',
     r"deep_field\.jsonl: line 1: JSON nested 50001 levels deep \(at column 50013\)"),
    # an integer over Python's 4300-digit conversion limit
    ("huge_int.json", b'[\n{"question": "q",\n "ground_truth_answer": ' + b"9" * 5000 + b"}]",
     r"huge_int\.json: line 3: invalid JSON: Exceeds the limit"),
    ("huge_int.jsonl", b'{"question": "q", "ground_truth_answer": ' + b"9" * 5000 + b"}\n",
     r"huge_int\.jsonl: line 1: invalid JSON: Exceeds the limit"),
])
def test_undecodable_files_name_the_line(tmp_path, name, content, location):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=location):
        read_math_tasks(path)


def test_parquet_with_bytes_or_a_cut_file(tmp_path):
    path = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"question": [b"\xff\xfe"], "ground_truth_answer": ["1"]}), path)
    with pytest.raises(DataFormatError, match=r"binary\.parquet: item 0: field 'question': expected a string, got bytes"):
        read_math_tasks(path)
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(MATH_ROWS[:2]), good)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(DataFormatError, match=r"cut\.parquet: unreadable parquet file"):
        read_math_tasks(cut)


def test_records_are_hashable_values():
    a = MathTask("q", "1", extra={"source": "x"})
    b = MathTask("q", "1", extra={"source": "y"})
    assert a == b and len({a, b}) == 1
    with pytest.raises(DataFormatError, match="test_input"):
        CodeTask(question="q", test_method="stdio", test_input=("1",), test_output=())


# ----------------------------------------------------------------------------- HumanEval


@pytest.fixture(scope="module")
def humaneval():
    return load_humaneval()


def _run_tests(code: str, tests: tuple[str, ...]) -> list[bool]:
    """The executor's function-test semantics, in-process: exec the code, then each test in the same namespace."""
    results = []
    for test in tests:
        namespace: dict = {}
        try:
            exec(code, namespace)
            exec(test, namespace)
            results.append(True)
        except SystemExit:
            results.append(True)
        except BaseException:
            results.append(False)
    return results


def test_humaneval_loads_all_problems(humaneval):
    assert len(humaneval) == HUMANEVAL_SIZE == 164
    assert len({t.extra["task_id"] for t in humaneval}) == 164
    assert all(t.test_method == "function" and t.prefix == t.question and t.num_tests >= 1 for t in humaneval)
    # Splitting the check function's asserts gives a graded reward: many more tests than problems.
    assert sum(t.num_tests for t in humaneval) > 4 * 164
    assert humaneval[0].test_list[0].rstrip().endswith("check(has_close_elements)")


@pytest.mark.parametrize("index", [0, 2, 32, 53, 100, 163])
def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(humaneval, index):
    task = humaneval[index]
    assert all(_run_tests(task.prefix + task.extra["canonical_solution"], task.test_list))
    assert not all(_run_tests(task.prefix + "    return None\n", task.test_list))
    unsplit = humaneval_test_list(_problem_test(index), task.extra["entry_point"], split_asserts=False)
    assert len(unsplit) == 1 and _run_tests(task.prefix + task.extra["canonical_solution"], unsplit) == [True]


def _problem_test(index: int) -> str:
    import gzip

    from tradojax.data.humaneval import humaneval_path

    with gzip.open(humaneval_path(), "rt") as handle:
        return [json.loads(line) for line in handle if line.strip()][index]["test"]


def test_humaneval_split_keeps_other_statements_and_nested_asserts():
    test = (
        "import math\n\n"
        "def check(candidate):\n"
        "    tolerance = 1e-6\n"
        "    assert True, 'sanity'\n"
        "    assert abs(candidate(1) - 2) < tolerance\n"
        "    for x in range(3):\n"
        "        assert candidate(x) == x + 1\n"
        "    assert candidate(5) == 6\n"
    )
    tests = humaneval_test_list(test, "inc")
    assert len(tests) == 2
    assert all("tolerance = 1e-06" in t and "import math" in t for t in tests)
    assert sum("for x in range(3)" in t for t in tests) == 1
    assert _run_tests("def inc(x):\n    return x + 1\n", tests) == [True, True]
    assert _run_tests("def inc(x):\n    return 2 if x == 1 else 0\n", tests) == [True, False]

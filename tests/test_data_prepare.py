"""`tradojax data prepare`: each public release's published layout -> the original's task schema."""

import base64
import json
import os
import pickle
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tradojax import cli
from tradojax.data.prepare import decode_private_tests, prepare
from tradojax.data.readers import DataFormatError, read_code_tasks, read_math_tasks


def write(tmp_path, name, records, fmt):
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_prepare(tmp_path, name, source, out="out.json"):
    out_path = tmp_path / out
    assert cli.main(["data", "prepare", name, "--from", str(source), "--out", str(out_path)]) == 0
    return out_path


def packed(value) -> str:
    """LiveCodeBench's compressed form: base64(zlib(pickle(...)))."""
    return base64.b64encode(zlib.compress(pickle.dumps(value))).decode()


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_math_train_takes_the_last_boxed_answer_and_skips_unboxed(tmp_path, capsys, fmt):
    records = [
        {"problem": "What is $1+2$?", "solution": "First $\\boxed{2}$ is wrong; it is $\\boxed{\\frac{6}{2}}$.",
         "level": "Level 1", "type": "Algebra"},
        {"problem": "No answer here.", "solution": "We cannot tell.", "level": "Level 5", "type": "Geometry"},
    ]
    out = run_prepare(tmp_path, "MATH", write(tmp_path, "math", records, fmt))
    (task,) = read_math_tasks(out)
    assert task.question == "What is $1+2$?" and task.ground_truth_answer == "\\frac{6}{2}"
    assert task.extra == {"level": "Level 1", "type": "Algebra"}
    assert "skipped 1 record(s)" in capsys.readouterr().err


def test_math500_gsm8k_and_aime_layouts(tmp_path):
    math500 = [{"problem": "P1", "solution": "... \\boxed{5}", "answer": "5", "subject": "Algebra", "level": 2,
                "unique_id": "test/algebra/1.json"}]
    (task,) = prepare("MATH500", write(tmp_path, "m500", math500, "jsonl")).tasks
    assert (task.question, task.ground_truth_answer, task.extra["unique_id"]) == ("P1", "5", "test/algebra/1.json")

    gsm8k = [{"question": "Tom has 1,200 apples and buys 34 more. How many?",
              "answer": "1,200 + 34 = <<1200+34=1234>>1,234\n#### 1,234"}]
    (task,) = read_math_tasks(run_prepare(tmp_path, "gsm8k", write(tmp_path, "gsm", gsm8k, "parquet")))
    assert task.ground_truth_answer == "1234" and task.question.startswith("Tom has")
    with pytest.raises(DataFormatError, match="####"):
        prepare("GSM8K", write(tmp_path, "gsm_bad", [{"question": "q", "answer": "no marker"}], "jsonl"))

    upper = [{"ID": "2024-I-1", "Problem": "Find m+n.", "Solution": "...", "Answer": 204}]
    lower = [{"id": 60, "problem": "Find x.", "solution": "...", "answer": "033", "url": "https://x"}]
    (a,) = prepare("AIME2024", write(tmp_path, "aime_upper", upper, "jsonl")).tasks
    (b,) = prepare("aime_2024", write(tmp_path, "aime_lower", lower, "parquet")).tasks
    assert (a.question, a.ground_truth_answer, a.extra) == ("Find m+n.", "204", {"id": "2024-I-1"})
    assert (b.question, b.ground_truth_answer, b.extra) == ("Find x.", "033", {"id": 60})


def livecodebench_record(**overrides):
    record = {"question_title": "Echo", "question_content": "Print the input twice.", "platform": "atcoder",
              "question_id": "abc001_a", "contest_id": "abc001", "contest_date": "2024-01-01T00:00:00",
              "starter_code": "", "difficulty": "easy",
              "public_test_cases": json.dumps([{"input": "3\n", "output": "3\n3\n", "testtype": "stdin"}]),
              "private_test_cases": packed(json.dumps([{"input": "7\n", "output": "7\n7\n", "testtype": "stdin"}])),
              "metadata": "{}"}
    return record | overrides


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_livecodebench_stdin_with_compressed_private_tests(tmp_path, fmt):
    out = run_prepare(tmp_path, "LiveCodeBench", write(tmp_path, "lcb", [livecodebench_record()], fmt))
    (task,) = read_code_tasks(out)
    assert task.test_method == "stdio" and task.question == "Print the input twice."
    assert task.test_input == ("3\n", "7\n") and task.test_output == ("3\n3\n", "7\n7\n")
    assert task.extra["question_id"] == "abc001_a" and task.extra["difficulty"] == "easy"
    # plain-JSON private tests (the uncompressed releases) read the same
    plain = livecodebench_record(private_test_cases=json.dumps([{"input": "7\n", "output": "7\n7\n",
                                                                 "testtype": "stdin"}]))
    (same,) = prepare("lcb", write(tmp_path, "lcb_plain", [plain], "jsonl")).tasks
    assert same.test_input == task.test_input


def test_livecodebench_functional_tests_become_executable_asserts(tmp_path):
    cases = [{"input": "[2,7,11,15]\n9", "output": "[0,1]", "testtype": "functional"},
             {"input": "[3,3]\n6", "output": "[0,1]", "testtype": "functional"}]
    starter = "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n        "
    record = livecodebench_record(platform="leetcode", starter_code=starter, public_test_cases=json.dumps(cases[:1]),
                                  private_test_cases=packed(json.dumps(cases[1:])),
                                  metadata=json.dumps({"func_name": "twoSum"}))
    (task,) = prepare("LiveCodeBench", write(tmp_path, "lcb_fn", [record], "parquet")).tasks
    assert task.test_method == "function" and task.prefix == ""
    assert task.test_list == ("assert Solution().twoSum([2, 7, 11, 15], 9) == [0, 1]",
                              "assert Solution().twoSum([3, 3], 6) == [0, 1]")
    assert "def twoSum(self, nums: List[int], target: int)" in task.question
    namespace = {}
    exec("class Solution:\n    def twoSum(self, nums, target):\n"
         "        seen = {}\n        for i, x in enumerate(nums):\n"
         "            if target - x in seen: return [seen[target - x], i]\n            seen[x] = i\n", namespace)
    for test in task.test_list:
        exec(test, namespace)


def test_private_tests_pickle_runs_no_code(tmp_path):
    """A crafted pickle that would call a function is refused before anything runs."""
    target = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(target),))

    evil = base64.b64encode(zlib.compress(pickle.dumps(Payload()))).decode()
    with pytest.raises(DataFormatError, match="refusing global .*mkdir"):
        decode_private_tests(evil, "lcb.jsonl", "line 1")
    assert not target.exists()
    not_a_string = base64.b64encode(zlib.compress(pickle.dumps([1, 2]))).decode()
    with pytest.raises(DataFormatError, match="holds a list"):
        decode_private_tests(not_a_string, "lcb.jsonl", "line 1")
    with pytest.raises(DataFormatError, match="neither JSON nor"):
        decode_private_tests("%%% not base64 %%%", "lcb.jsonl", "line 1")


def test_mbpp_full_and_sanitized_layouts(tmp_path):
    full = [{"task_id": 2, "text": "Write a function to add two numbers.",
             "code": "import math\ndef add_nums(a, b):\n    return a + b",
             "test_list": ["assert add_nums(1, 2) == 3", "assert add_nums(-1, 1) == 0"],
             "test_setup_code": "OFFSET = 0", "challenge_test_list": []}]
    (task,) = read_code_tasks(run_prepare(tmp_path, "MBPP", write(tmp_path, "mbpp", full, "jsonl"), "mbpp.jsonl"))
    assert task.test_method == "function" and task.prefix == "import math\ndef add_nums(a, b):\n"
    assert task.test_list == ("OFFSET = 0\nassert add_nums(1, 2) == 3", "OFFSET = 0\nassert add_nums(-1, 1) == 0")
    assert task.question == ("Write a function to add two numbers.\nYour code should pass these tests:\n"
                             "assert add_nums(1, 2) == 3\nassert add_nums(-1, 1) == 0")
    namespace = {}
    exec(full[0]["code"], namespace)
    for test in task.test_list:
        exec(test, namespace)

    sanitized = [{"source_file": "mbpp.jsonl", "task_id": 11, "prompt": "Remove the first 'x'.",
                  "code": "def remove_x(s):\n    return s.replace('x', '', 1)",
                  "test_imports": ["import re"], "test_list": ["assert remove_x('axbx') == 'abx'"]}]
    (task,) = prepare("mbpp", write(tmp_path, "mbpp_s", sanitized, "parquet")).tasks
    assert task.test_list == ("import re\nassert remove_x('axbx') == 'abx'",)
    assert task.prefix == "def remove_x(s):\n" and task.extra == {"task_id": 11}


def test_humaneval_layout(tmp_path):
    prompt = 'def inc(x: int) -> int:\n    """Return x + 1."""\n'
    record = {"task_id": "HumanEval/0", "prompt": prompt, "canonical_solution": "    return x + 1\n",
              "test": "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-1) == 0\n",
              "entry_point": "inc"}
    (task,) = read_code_tasks(run_prepare(tmp_path, "HumanEval", write(tmp_path, "he", [record], "jsonl")))
    assert task.prefix == prompt and task.question == prompt and len(task.test_list) == 2
    namespace = {}
    exec(prompt + record["canonical_solution"], namespace)
    for test in task.test_list:
        exec(test, namespace)


def test_unknown_layout_lists_found_and_expected_columns(tmp_path, capsys):
    source = write(tmp_path, "wrong", [{"problem": "P", "solution": "S"}], "jsonl")
    assert cli.main(["data", "prepare", "GSM8K", "--from", str(source), "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert "not a GSM8K layout: found columns ['problem', 'solution']; expected {question, answer}" in err
    assert "Traceback" not in err
    assert cli.main(["data", "prepare", "SQuAD", "--from", str(source), "--out", str(tmp_path / "o.json")]) == 2
    assert "unknown dataset 'SQuAD'" in capsys.readouterr().err
    assert cli.main(["data", "prepare", "MBPP", "--from", str(source), "--out", str(tmp_path / "o.json")]) == 2
    assert "expected {text, test_list} or {prompt, test_list}" in capsys.readouterr().err

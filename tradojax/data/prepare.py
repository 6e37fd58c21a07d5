"""`tradojax data prepare NAME --from FILE --out FILE`: public benchmark releases -> the original's
JSON schemas (spec section 7), from files the user downloaded (nothing is fetched).

Each converter reads one published layout (.parquet, .jsonl or .json, with that release's column
names) and writes math tasks `{"question", "ground_truth_answer"}` or code tasks `{"question",
"test_time_limit", "test_method", "test_list" | "test_input"/"test_output", "prefix"}`; the
release's own identifiers ride along as extra fields. Answers are taken as the original does: the
text after GSM8K's `####`, the last `\\boxed{}` of a MATH solution (`rewards.math.extract_boxed_answer`).

LiveCodeBench's private tests may be base64(zlib(pickle(JSON string))). Pickle is code: the
decoder accepts only a pickle that builds a plain str (an unpickler that resolves no global at all),
so a crafted file can run nothing; anything else is an error naming the record.
"""

from __future__ import annotations

import argparse
import ast
import base64
import dataclasses
import io
import json
import pickle
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from tradojax.data.humaneval import humaneval_test_list
from tradojax.data.readers import CodeTask, DataFormatError, MathTask, iter_raw_records, write_records
from tradojax.rewards.math import extract_boxed_answer

MAX_DECOMPRESSED_BYTES = 512 * 1024 * 1024  # one record's private tests; guards a zlib bomb


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """One published layout: the columns it must have and how a record becomes a task."""

    required: tuple[str, ...]
    convert: Callable[[dict[str, Any], str, str], MathTask | CodeTask | None]  # (record, file, location)
    note: str = ""


def _text(record: Mapping[str, Any], name: str, file: str, location: str) -> str:
    value = record.get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataFormatError(f"expected a string, got {type(value).__name__}", file=file, location=location, field=name)
    return value


def _extras(record: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    return {name: record[name] for name in names if name in record}


# -- math


def _math_train(record, file, location):
    """MATH (Hendrycks) train: problem, solution, level, type; the answer is the solution's last box."""
    answer = extract_boxed_answer(_text(record, "solution", file, location))
    if answer is None:
        return None  # no boxed answer to verify against
    return MathTask(_text(record, "problem", file, location), answer.strip(), _extras(record, ("level", "type")))


def _math500(record, file, location):
    return MathTask(_text(record, "problem", file, location), _text(record, "answer", file, location).strip(),
                    _extras(record, ("subject", "level", "unique_id")))


def gsm8k_answer(answer: str) -> str | None:
    """The final answer of a GSM8K solution: the text after `####`, thousands separators removed."""
    if "####" not in answer:
        return None
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def _gsm8k(record, file, location):
    answer = gsm8k_answer(_text(record, "answer", file, location))
    if answer is None:
        raise DataFormatError("no '#### <answer>' line", file=file, location=location, field="answer")
    return MathTask(_text(record, "question", file, location), answer)


def _aime(record, file, location):
    lower = {key.lower(): value for key, value in record.items()}
    extra = {"id": lower["id"]} if "id" in lower else {}
    return MathTask(_text(lower, "problem", file, location), _text(lower, "answer", file, location).strip(), extra)


# -- code


class _StrOnlyUnpickler(pickle.Unpickler):
    """Resolves no global: only pickles of plain data (here: one str) load; nothing is called."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing persistent id")


def decode_private_tests(value: str, file: str, location: str) -> list[dict[str, Any]]:
    """LiveCodeBench `private_test_cases`: a JSON list, or base64(zlib(pickle(JSON string)))."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    where = dict(file=file, location=location, field="private_test_cases")
    try:
        packed = base64.b64decode(value, validate=True)
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, MAX_DECOMPRESSED_BYTES)
        if inflater.unconsumed_tail:
            raise DataFormatError(f"decompresses to more than {MAX_DECOMPRESSED_BYTES} bytes", **where)
        text = _StrOnlyUnpickler(io.BytesIO(raw)).load()
    except DataFormatError:
        raise
    except Exception as err:  # binascii, zlib and pickle errors: the value is neither form
        raise DataFormatError(f"neither JSON nor base64-zlib-pickled JSON ({type(err).__name__}: {err})",
                              **where) from None
    if not isinstance(text, str):
        raise DataFormatError(f"the pickle holds a {type(text).__name__}, expected a JSON string", **where)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"the unpickled string is not JSON ({err.msg})", **where) from None


def _json_field(record, name, file, location):
    value = record.get(name, "[]" if name == "private_test_cases" else None)
    if isinstance(value, (list, dict)):
        return value
    if not isinstance(value, str):
        raise DataFormatError(f"expected a JSON string, got {type(value).__name__}", file=file, location=location,
                              field=name)
    if name == "private_test_cases":
        return decode_private_tests(value, file, location) if value else []
    try:
        return json.loads(value) if value else {}
    except json.JSONDecodeError as err:
        raise DataFormatError(f"invalid JSON ({err.msg})", file=file, location=location, field=name) from None


def _call_literal(line: str) -> str:
    """One functional-test argument (a JSON value on its own line) as Python source."""
    return repr(json.loads(line))


STARTER_CODE_NOTE = "\n\nYou will use the following starter code to write the solution to the problem:\n```python\n{}\n```"


def _livecodebench(record, file, location):
    """LiveCodeBench code_generation(_lite): stdin tests -> stdio; functional (LeetCode) tests ->
    asserts on `Solution().<metadata.func_name>(*args)`, the starter code shown in the question."""
    question = _text(record, "question_content", file, location)
    starter = record.get("starter_code") or ""
    tests = list(_json_field(record, "public_test_cases", file, location))
    tests += list(_json_field(record, "private_test_cases", file, location))
    if not tests:
        raise DataFormatError("no test cases", file=file, location=location, field="public_test_cases")
    kinds = {case.get("testtype") for case in tests}
    extra = _extras(record, ("question_title", "question_id", "platform", "contest_date", "difficulty"))
    if kinds == {"stdin"}:
        return CodeTask(question, "stdio", test_input=tuple(c["input"] for c in tests),
                        test_output=tuple(c["output"] for c in tests), extra=extra)
    if kinds != {"functional"}:
        raise DataFormatError(f"test types {sorted(map(str, kinds))}: expected all 'stdin' or all 'functional'",
                              file=file, location=location, field="public_test_cases")
    metadata = _json_field(record, "metadata", file, location)
    func_name = metadata.get("func_name") if isinstance(metadata, dict) else None
    if not func_name:
        raise DataFormatError("functional tests need metadata.func_name", file=file, location=location,
                              field="metadata")
    asserts = []
    for case in tests:
        try:
            args = ", ".join(_call_literal(line) for line in case["input"].strip().split("\n"))
            expected = _call_literal(case["output"].strip())
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise DataFormatError(f"functional test case is not JSON lines ({err})", file=file, location=location,
                                  field="public_test_cases") from None
        asserts.append(f"assert Solution().{func_name}({args}) == {expected}")
    if starter:
        question += STARTER_CODE_NOTE.format(starter.rstrip())
    return CodeTask(question, "function", test_list=tuple(asserts), prefix="", extra=extra | {"func_name": func_name})


def mbpp_prefix(code: str, tests: Iterable[str]) -> str:
    """The reference solution's imports and the signature of the function the tests call (the
    model continues it), or "" when the code does not parse."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return ""
    called = " ".join(tests)
    lines = code.splitlines()
    imports = [ast.get_source_segment(code, node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and f"{node.name}(" in called:
            header = "\n".join(lines[node.lineno - 1: node.body[0].lineno - 1])
            return "\n".join([*imports, header]) + "\n"
    return ""


def _mbpp(record, file, location):
    """MBPP (full: text, test_setup_code; sanitized: prompt, test_imports): asserts of test_list,
    each after the setup code; the question shows the tests (the function name comes from them)."""
    text = _text(record, "text" if "text" in record else "prompt", file, location)
    tests = record.get("test_list")
    if not isinstance(tests, (list, tuple)) or not tests or not all(isinstance(t, str) for t in tests):
        raise DataFormatError("expected a non-empty list of assert strings", file=file, location=location,
                              field="test_list")
    setup = record.get("test_setup_code") or "\n".join(record.get("test_imports") or ())
    test_list = tuple(f"{setup}\n{test}" if setup else test for test in tests)
    question = text + "\nYour code should pass these tests:\n" + "\n".join(tests)
    prefix = mbpp_prefix(record.get("code") or "", tests)
    return CodeTask(question, "function", test_list=test_list, prefix=prefix, extra=_extras(record, ("task_id",)))


def _humaneval(record, file, location):
    prompt = _text(record, "prompt", file, location)
    tests = humaneval_test_list(_text(record, "test", file, location), _text(record, "entry_point", file, location))
    return CodeTask(prompt, "function", test_list=tests, prefix=prompt,
                    extra=_extras(record, ("task_id", "entry_point")))


DATASETS: dict[str, tuple[Layout, ...]] = {
    "MATH_train": (Layout(("problem", "solution"), _math_train, "answer: the solution's last \\boxed{}"),),
    "MATH500": (Layout(("problem", "answer"), _math500),),
    "GSM8K": (Layout(("question", "answer"), _gsm8k, "answer: after '####'"),),
    "AIME2024": (Layout(("Problem", "Answer"), _aime), Layout(("problem", "answer"), _aime)),
    "LiveCodeBench": (Layout(("question_content", "public_test_cases"), _livecodebench),),
    "MBPP": (Layout(("text", "test_list"), _mbpp), Layout(("prompt", "test_list"), _mbpp, "the sanitized variant")),
    "HumanEval": (Layout(("prompt", "test", "entry_point"), _humaneval),),
}
KIND = {"MATH_train": "math", "MATH500": "math", "GSM8K": "math", "AIME2024": "math",
        "LiveCodeBench": "code", "MBPP": "code", "HumanEval": "code"}
_ALIASES = {name.lower().replace("_", "").replace("-", ""): name for name in DATASETS}
_ALIASES |= {"math": "MATH_train", "aime": "AIME2024", "aime24": "AIME2024", "lcb": "LiveCodeBench"}


def dataset_name(name: str) -> str:
    key = name.lower().replace("_", "").replace("-", "")
    if key not in _ALIASES:
        raise DataFormatError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")
    return _ALIASES[key]


def choose_layout(name: str, columns: Iterable[str], file: str) -> Layout:
    """The layout whose required columns are present; else an error listing found and expected."""
    found = set(columns)
    for layout in DATASETS[name]:
        if set(layout.required) <= found:
            return layout
    expected = " or ".join("{" + ", ".join(layout.required) + "}" for layout in DATASETS[name])
    raise DataFormatError(f"not a {name} layout: found columns {sorted(found)}; expected {expected}", file=file)


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    tasks: list
    skipped: list[str]  # locations of records without a verifiable answer


def prepare(name: str, source: str | Path) -> PrepareResult:
    """Converts a downloaded release of `name` into tasks in the original's schema."""
    name = dataset_name(name)
    file = str(source)
    records = list(iter_raw_records(source))
    if not records:
        raise DataFormatError("no records", file=file)
    layout = choose_layout(name, records[0][1].keys(), file)
    tasks, skipped = [], []
    for location, record in records:
        missing = [column for column in layout.required if column not in record]
        if missing:
            raise DataFormatError(f"missing column(s) {missing}", file=file, location=location)
        task = layout.convert(record, file, location)
        if task is None:
            skipped.append(location)
        else:
            tasks.append(task)
    return PrepareResult(tasks, skipped)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def data_main(argv: list[str]) -> int:
    """`tradojax data prepare NAME --from FILE --out FILE`."""
    parser = argparse.ArgumentParser(prog="tradojax data", description="dataset tools")
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser(
        "prepare", help="convert a downloaded benchmark release into the original's JSON schema",
        description="Converts a downloaded release (.parquet/.jsonl/.json with its published column names) "
                    f"into the dLLM-RL task schema. NAME: {', '.join(DATASETS)}.")
    prep.add_argument("name", metavar="NAME", help="the dataset (case and '_' do not matter)")
    prep.add_argument("--from", dest="source", metavar="FILE", required=True, help="the downloaded file")
    prep.add_argument("--out", metavar="FILE", required=True,
                      help="output .json (a list, as the original's data/) or .jsonl")
    args = parser.parse_args(argv)
    name = dataset_name(args.name)
    result = prepare(name, args.source)
    if not result.tasks:
        raise DataFormatError("no record could be converted", file=args.source)
    out = write_records(args.out, result.tasks)
    print(f"{name}: {len(result.tasks)} {KIND[name]} tasks -> {out}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} record(s) without a boxed answer: {', '.join(result.skipped[:5])}"
              + (" ..." if len(result.skipped) > 5 else ""), file=sys.stderr)
    return 0

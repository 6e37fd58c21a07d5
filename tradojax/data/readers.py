"""Typed records and validating readers for the dLLM-RL data formats (spec section 7).

Formats, one record per task:

* math / general: ``{"question": str, "ground_truth_answer": str, ...free extra fields}``
* code: ``{"question": str, "test_time_limit": number (default 1), "test_method": "function"|"stdio"}``
  plus ``"test_list": [assert strings]`` and optional ``"prefix": str`` for function tests, or
  ``"test_input": [str]`` and ``"test_output": [str]`` of equal length for stdio tests.
* SFT: ``{"prompt": str (already chat-templated), "response": str[, "step_map": [int]]}``

Files are ``.json`` (a list of objects), ``.jsonl`` (one object per line) or ``.parquet``. Every
error names the file, the record (``item <i>`` for json/parquet, ``line <n>`` for jsonl) and the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

DataType = Literal["math", "code", "sft"]
TestMethod = Literal["function", "stdio"]


class DataFormatError(ValueError):
    """A data file or record does not follow the expected format.

    Attributes name where: ``file``, ``location`` (e.g. ``"line 3"`` or ``"item 0"``) and ``field``.
    """

    def __init__(self, message: str, *, file: str | None = None, location: str | None = None, field: str | None = None):
        self.file, self.location, self.field, self.reason = file, location, field, message
        where = [part for part in (file, location, f"field {field!r}" if field else None) if part]
        super().__init__(": ".join(where + [message]))


@dataclasses.dataclass(frozen=True)
class MathTask:
    """A verifiable math (or general boxed-answer) task."""

    question: str
    ground_truth_answer: str
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The original JSON form (extra fields included)."""
        return {**self.extra, "question": self.question, "ground_truth_answer": self.ground_truth_answer}


@dataclasses.dataclass(frozen=True)
class CodeTask:
    """A code task checked by function asserts (``test_list``) or stdio cases."""

    question: str
    test_method: TestMethod
    test_time_limit: float = 1.0
    test_list: tuple[str, ...] = ()
    prefix: str | None = None
    test_input: tuple[str, ...] = ()
    test_output: tuple[str, ...] = ()
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.test_method not in ("function", "stdio"):
            raise DataFormatError(f"must be 'function' or 'stdio', got {self.test_method!r}", field="test_method")
        if self.test_method == "function" and not self.test_list:
            raise DataFormatError("a function task needs at least one test", field="test_list")
        if self.test_method == "stdio":
            if not self.test_input:
                raise DataFormatError("a stdio task needs at least one test case", field="test_input")
            if len(self.test_input) != len(self.test_output):
                raise DataFormatError(
                    f"has {len(self.test_input)} cases but test_output has {len(self.test_output)}",
                    field="test_input",
                )

    @property
    def num_tests(self) -> int:
        """Number of tests (asserts or stdio cases); the RL reward counts passed tests."""
        return len(self.test_list) if self.test_method == "function" else len(self.test_input)

    def to_dict(self) -> dict[str, Any]:
        """The original JSON form (extra fields included)."""
        record: dict[str, Any] = {
            **self.extra,
            "question": self.question,
            "test_time_limit": self.test_time_limit,
            "test_method": self.test_method,
        }
        if self.test_method == "function":
            record["test_list"] = list(self.test_list)
            if self.prefix is not None:
                record["prefix"] = self.prefix
        else:
            record["test_input"] = list(self.test_input)
            record["test_output"] = list(self.test_output)
        return record


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """An SFT pair: ``prompt`` is already chat-templated; ``response`` ends with the end-of-turn text."""

    prompt: str
    response: str
    step_map: tuple[int, ...] | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The original JSON form (extra fields included)."""
        record = {**self.extra, "prompt": self.prompt, "response": self.response}
        if self.step_map is not None:
            record["step_map"] = list(self.step_map)
        return record


Record = MathTask | CodeTask | SFTExample


# ----------------------------------------------------------------------------- raw file reading


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _deepest_nesting(text: str) -> tuple[int, int]:
    """(depth, index) of the first deepest ``[``/``{`` outside JSON strings (error path only)."""
    depth = deepest = where = 0
    in_string = escaped = False
    for index, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest, where = depth, index
        elif char in "]}":
            depth -= 1
    return deepest, where


def _line_and_column(text: str, index: int) -> tuple[int, int]:
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, index - line_start + 1


def _decode_utf8(raw: bytes, file: str, first_line: int = 1, location: str | None = None) -> str:
    """`raw` as text; invalid UTF-8 names its line and byte offset (in the file when `location` is None)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + raw.count(b"\n", 0, err.start)
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        where = location or f"line {line}"
        at = f"byte {err.start}" if location is None else f"column {column} (byte {err.start} of the line)"
        raise DataFormatError(f"invalid UTF-8 at {at}: {err.reason} "
                              f"(byte 0x{raw[err.start]:02x}); data files must be UTF-8 text",
                              file=file, location=where) from None


def parse_json_text(text: str, file: str, location: str | None = None) -> Any:
    """json.loads with every failure (syntax, nesting past the recursion limit, 5000-digit integers)
    turned into a DataFormatError naming the line (`location` for one JSONL line, else from the error)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = location or f"line {err.lineno}"
        raise DataFormatError(f"invalid JSON ({err.msg} at column {err.colno})", file=file, location=where) from None
    except RecursionError:
        depth, index = _deepest_nesting(text)
        line, column = _line_and_column(text, index)
        where = location or f"line {line}"
        raise DataFormatError(f"JSON nested {depth} levels deep (at column {column}): too deep to read",
                              file=file, location=where) from None
    except ValueError as err:  # e.g. an integer literal over Python's 4300-digit conversion limit
        if location is None:
            long_number = re.search(r"\d{4300}", text)
            if long_number:
                location = f"line {_line_and_column(text, long_number.start())[0]}"
        raise DataFormatError(f"invalid JSON: {err}", file=file, location=location) from None


def read_utf8_text(path: str | os.PathLike) -> str:
    """A whole text file; invalid UTF-8 or an unreadable file is a DataFormatError naming line and byte."""
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise DataFormatError(f"cannot read the file: {err.strerror or err}", file=file) from None
    return _decode_utf8(raw, file)


def iter_raw_records(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(location, record)`` from a .json list, .jsonl or .parquet file, checking the syntax."""
    file = str(path)
    p = Path(path)
    if not p.is_file():
        raise DataFormatError("file does not exist", file=file)
    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet"):
        raise DataFormatError(f"unsupported file type {suffix!r} (expected .json, .jsonl or .parquet)", file=file)
    try:
        if suffix == ".parquet":
            yield from _iter_parquet(p, file)
            return
        with p.open("rb") as handle:
            if suffix == ".jsonl":
                for line_number, raw_line in enumerate(handle, start=1):
                    location = f"line {line_number}"
                    line = _decode_utf8(raw_line, file, line_number, location)
                    if not line.strip():
                        continue
                    record = parse_json_text(line, file, location)
                    if not isinstance(record, dict):
                        raise DataFormatError(f"expected a JSON object, got {_type_name(record)}", file=file,
                                              location=location)
                    yield location, record
                return
            data = parse_json_text(_decode_utf8(handle.read(), file), file, None)
    except OSError as err:  # unreadable (permissions, I/O error)
        raise DataFormatError(f"cannot read the file: {err.strerror or err}", file=file) from None
    if not isinstance(data, list):
        raise DataFormatError(f"expected a JSON list of objects at the top level, got {_type_name(data)}", file=file)
    for index, record in enumerate(data):
        location = f"item {index}"
        if not isinstance(record, dict):
            raise DataFormatError(f"expected a JSON object, got {_type_name(record)}", file=file, location=location)
        yield location, record


def _iter_parquet(p: Path, file: str) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError / UnicodeDecodeError for a corrupt file
        raise DataFormatError(f"unreadable parquet file: {err}", file=file) from None
    for index, record in enumerate(rows):
        # A parquet column exists for every row; a null there means the field is absent.
        yield f"item {index}", {key: value for key, value in record.items() if value is not None}


# ----------------------------------------------------------------------------- field validation


class _Fields:
    """Typed access to one raw record, raising DataFormatError with file/location/field."""

    def __init__(self, record: Mapping[str, Any], file: str | None, location: str | None):
        self.record, self.file, self.location = record, file, location

    def error(self, field: str, message: str) -> DataFormatError:
        return DataFormatError(message, file=self.file, location=self.location, field=field)

    def string(self, field: str, *, required: bool = True, allow_numbers: bool = False) -> str | None:
        if field not in self.record or self.record[field] is None:
            if required:
                raise self.error(field, "missing required field")
            return None
        value = self.record[field]
        if isinstance(value, str):
            return value
        if allow_numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise self.error(field, f"expected a finite number or a string, got {value!r}")
            return str(value)
        raise self.error(field, f"expected a string, got {_type_name(value)}")

    def string_list(self, field: str, *, required: bool = True) -> tuple[str, ...]:
        if field not in self.record or self.record[field] is None:
            if required:
                raise self.error(field, "missing required field")
            return ()
        value = self.record[field]
        if not isinstance(value, (list, tuple)):
            raise self.error(field, f"expected a list of strings, got {_type_name(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(field, f"element {index}: expected a string, got {_type_name(item)}")
        return tuple(value)

    def positive_number(self, field: str, default: float) -> float:
        value = self.record.get(field)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise self.error(field, f"expected a positive number, got {value!r}")
        return float(value)

    def int_list(self, field: str) -> tuple[int, ...] | None:
        value = self.record.get(field)
        if value is None:
            return None
        if not isinstance(value, (list, tuple)):
            raise self.error(field, f"expected a list of integers, got {_type_name(value)}")
        for index, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int):
                raise self.error(field, f"element {index}: expected an integer, got {_type_name(item)}")
        return tuple(value)

    def extra(self, known: Iterable[str]) -> Mapping[str, Any]:
        known = set(known)
        return {k: v for k, v in self.record.items() if k not in known}


_MATH_FIELDS = ("question", "ground_truth_answer")
_CODE_FIELDS = ("question", "test_time_limit", "test_method", "test_list", "prefix", "test_input", "test_output")
_SFT_FIELDS = ("prompt", "response", "step_map")


def math_task_from_dict(record: Mapping[str, Any], *, file: str | None = None, location: str | None = None) -> MathTask:
    """Validate one math record. Numeric answers (some exports write 42, not "42") become strings."""
    fields = _Fields(record, file, location)
    return MathTask(
        question=fields.string("question"),
        ground_truth_answer=fields.string("ground_truth_answer", allow_numbers=True),
        extra=fields.extra(_MATH_FIELDS),
    )


def code_task_from_dict(record: Mapping[str, Any], *, file: str | None = None, location: str | None = None) -> CodeTask:
    """Validate one code record (function or stdio tests)."""
    fields = _Fields(record, file, location)
    question = fields.string("question")
    method = fields.string("test_method")
    if method not in ("function", "stdio"):
        raise fields.error("test_method", f"expected 'function' or 'stdio', got {method!r}")
    time_limit = fields.positive_number("test_time_limit", default=1.0)
    if method == "function":
        test_list = fields.string_list("test_list")
        if not test_list:
            raise fields.error("test_list", "a function task needs at least one test")
        return CodeTask(
            question=question,
            test_method="function",
            test_time_limit=time_limit,
            test_list=test_list,
            prefix=fields.string("prefix", required=False),
            extra=fields.extra(_CODE_FIELDS),
        )
    test_input = fields.string_list("test_input")
    test_output = fields.string_list("test_output")
    if len(test_input) != len(test_output):
        raise fields.error(
            "test_output", f"has {len(test_output)} entries but test_input has {len(test_input)}; they must be equal"
        )
    if not test_input:
        raise fields.error("test_input", "a stdio task needs at least one test case")
    return CodeTask(
        question=question,
        test_method="stdio",
        test_time_limit=time_limit,
        test_input=test_input,
        test_output=test_output,
        extra=fields.extra(_CODE_FIELDS),
    )


def sft_example_from_dict(record: Mapping[str, Any], *, file: str | None = None, location: str | None = None) -> SFTExample:
    """Validate one SFT record (``prompt``, ``response``, optional integer ``step_map``)."""
    fields = _Fields(record, file, location)
    return SFTExample(
        prompt=fields.string("prompt"),
        response=fields.string("response"),
        step_map=fields.int_list("step_map"),
        extra=fields.extra(_SFT_FIELDS),
    )


_PARSERS: dict[str, Callable[..., Record]] = {
    "math": math_task_from_dict,
    "code": code_task_from_dict,
    "sft": sft_example_from_dict,
}


def read_records(path: str | os.PathLike, data_type: DataType) -> list[Record]:
    """Read and validate every record of ``path`` as ``data_type`` ("math", "code" or "sft")."""
    if data_type not in _PARSERS:
        raise ValueError(f"data_type must be one of {sorted(_PARSERS)}, got {data_type!r}")
    parse = _PARSERS[data_type]
    file = str(path)
    records = [parse(raw, file=file, location=location) for location, raw in iter_raw_records(path)]
    if not records:
        raise DataFormatError("contains no records", file=file)
    return records


def read_math_tasks(path: str | os.PathLike) -> list[MathTask]:
    """Read a math data file (see module docstring)."""
    return read_records(path, "math")  # type: ignore[return-value]


def read_code_tasks(path: str | os.PathLike) -> list[CodeTask]:
    """Read a code data file (see module docstring)."""
    return read_records(path, "code")  # type: ignore[return-value]


def read_sft_examples(path: str | os.PathLike) -> list[SFTExample]:
    """Read an SFT data file (see module docstring)."""
    return read_records(path, "sft")  # type: ignore[return-value]


def write_records(path: str | os.PathLike, records: Sequence[Record | Mapping[str, Any]]) -> Path:
    """Write records in their original JSON form to .json (a list) or .jsonl; returns the path."""
    p = Path(path)
    rows = [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in records]
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix.lower() == ".jsonl":
        p.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    elif p.suffix.lower() == ".json":
        p.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        raise DataFormatError(f"unsupported output type {p.suffix!r} (expected .json or .jsonl)", file=str(p))
    return p

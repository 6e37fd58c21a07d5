"""The safetensors format, read lazily and written one tensor at a time.

Reading: `SafetensorsDirectory` opens the `*.safetensors` files of a checkpoint directory
(memory-mapped by safetensors; `model.safetensors.index.json` says which file holds which tensor)
and hands out lazy slices, so a device shard reads only its bytes.

Writing: the tensors are planned first (`PlannedTensor`: name, shape, dtype), packed greedily
into files of at most `max_shard_bytes` (`plan_files`), and then written strictly in plan order
(`SafetensorsWriter`), so a sharded model never has to be on the host whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import ml_dtypes  # also registers bfloat16 with numpy, which safetensors' numpy reader needs
import numpy as np
from safetensors import SafetensorError, safe_open

from tradojax.models.hf_keys import HFCheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # as `transformers` save_pretrained ("5GB")

ST_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16, "F64": np.float64}
ST_NAMES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16"}


class SafetensorsDirectory:
    """The safetensors files of a checkpoint directory, opened lazily (memory-mapped by safetensors).

    With `model.safetensors.index.json` the index decides which file holds which tensor;
    otherwise every `*.safetensors` file in the directory is searched.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        index = self.directory / INDEX_FILE
        self.index_file = index if index.is_file() else None
        if self.index_file is not None:
            self._read_index()
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                others = [p.name for p in self.directory.glob("*.bin")] + [p.name for p in self.directory.glob("*.pt")]
                hint = f" (found {', '.join(others)}: convert them to safetensors first)" if others else ""
                raise HFCheckpointError(f"{self.directory}: no *.safetensors files{hint}")
            for file in files:
                for name in self._open(file).keys():
                    self._where.setdefault(name, file)
        self.files = sorted(set(self._where.values()) | set(self._handles))

    def _read_index(self) -> None:
        try:
            data = json.loads(self.index_file.read_text())
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise HFCheckpointError(f"{self.index_file}: not a valid safetensors index ({err})") from None
        for name, file_name in weight_map.items():
            file = self.directory / file_name
            if not file.is_file():
                raise HFCheckpointError(
                    f"{self.index_file}: tensor {name!r} is mapped to {file_name}, which does not exist in {self.directory}")
            self._where[name] = file

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="numpy"))
            except (SafetensorError, OSError, ValueError) as err:
                held = [n for n, f in self._where.items() if f == file][:3]
                holding = f" (it should hold {', '.join(held)}, ...)" if held else ""
                raise HFCheckpointError(
                    f"{file}: cannot read this safetensors file, it is truncated or corrupt{holding}: {err}") from None
        return self._handles[file]

    def names(self) -> set[str]:
        return set(self._where)

    def locate(self, name: str) -> Path:
        if name not in self._where:
            searched = self.index_file.name if self.index_file else ", ".join(f.name for f in self.files)
            raise HFCheckpointError(f"tensor {name!r} not found in {self.directory} (searched {searched})")
        return self._where[name]

    def tensor_slice(self, name: str):
        """safetensors' lazy slice of tensor `name` (`.get_shape()`, `.get_dtype()`, `[slices]`)."""
        file = self.locate(name)
        try:
            return self._open(file).get_slice(name)
        except SafetensorError as err:
            raise HFCheckpointError(f"{file}: tensor {name!r} cannot be read: {err}") from None

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> SafetensorsDirectory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclasses.dataclass
class PlannedTensor:
    """One tensor of an export, placed (file, byte offset) before any data is written."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    file: int = 0
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_files(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[str]:
    """Packs `tensors` greedily in their order into files of at most `max_shard_bytes` (a larger
    tensor gets a file of its own), setting each one's file and offset; returns the file names
    (`model.safetensors`, or `model-0000i-of-0000N.safetensors`)."""
    file, used = 0, 0
    for i, t in enumerate(tensors):
        if i and used + t.nbytes > max_shard_bytes:  # the current file holds a tensor already
            file, used = file + 1, 0
        t.file, t.offset = file, used
        used += t.nbytes
    n = file + 1
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _write_header(handle, tensors: list[PlannedTensor]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for t in tensors:
        header[t.name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [t.offset, t.offset + t.nbytes]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    handle.write(len(raw).to_bytes(8, "little"))
    handle.write(raw)


class SafetensorsWriter:
    """Writes planned tensors (`plan_files`) into `directory`, which the caller has created; they
    must arrive in plan order. Use as a context manager; `write_index` after the last tensor."""

    def __init__(self, directory: str | os.PathLike, tensors: list[PlannedTensor], file_names: list[str]):
        self.directory = Path(directory)
        self.tensors, self.file_names = tensors, file_names
        self._handle = None
        self._current = -1

    def write(self, tensor: PlannedTensor, data: np.ndarray) -> None:
        if tensor.file != self._current:
            if self._handle is not None:
                self._handle.close()
            self._current = tensor.file
            self._handle = open(self.directory / self.file_names[self._current], "wb")
            _write_header(self._handle, [t for t in self.tensors if t.file == self._current])
        self._handle.write(np.ascontiguousarray(data.astype(tensor.dtype)).tobytes())

    def write_index(self) -> None:
        """`model.safetensors.index.json` (only when there are several files)."""
        if len(self.file_names) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in self.tensors)},
                     "weight_map": {t.name: self.file_names[t.file] for t in self.tensors}}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

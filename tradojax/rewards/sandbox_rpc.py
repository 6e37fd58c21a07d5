"""Function-style tests judged outside the program: the wire format, the program server and the
judge's proxies (standard library only).

The program runs in a **program server**, a process that loads the program and then answers
requests on one socket; it never holds a test's source or expected values. Each test runs
in a **judge**, a separate sandboxed process that holds the test and executes it with real
Python, where every name the program defines is a `RemoteRef`: calling it, reading an attribute
or indexing it is a request to the server. Values cross the socket as plain data only (None,
bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset), rebuilt by the
receiver with exact builtin types; anything else stays on its side as a reference. So the
comparisons of a test (``assert f(2) == 4``) run in the judge on plain data the program cannot
subclass, and the verdict is the judge's: the program holds no channel to it.

What the program can still decide is inherent to its role: the truth value, ``len``, ``str`` and
iteration of its own objects, and comparisons between two of its own objects. It never receives
a test's expected value (a plain value never meets a program object's ``__eq__``: such a
comparison is False), only the arguments the test passes it.

Cost: each use of a program object from a test is a socket round trip (about 0.2 ms on a loaded
2-core host: a test making 5000 calls takes about 1 s of its time limit).
"""

from __future__ import annotations

import base64
import builtins
import json
import os
import select
import struct
import time

MAX_FRAME_BYTES = 16 << 20  # one request or reply
MAX_REASON_CHARS = 300
_HEADER = struct.Struct(">I")
_MAX_DEPTH = 100  # deeper values stay references
_PROGRAM_EXITS = ("SystemExit", "KeyboardInterrupt", "GeneratorExit")


class WireError(Exception):
    """A malformed, oversized or missing message from the other side."""


class ProgramExited(Exception):
    """The program raised SystemExit (or exited) while serving a test: the test fails."""


class ProgramError(Exception):
    """An exception of a program-defined class, raised while serving a test."""


def clip(text: str, limit: int = MAX_REASON_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# -- framing ---------------------------------------------------------------------------------


def write_frame(fd: int, message: object) -> None:
    data = json.dumps(message).encode("utf-8")
    if len(data) > MAX_FRAME_BYTES:
        raise WireError(f"message of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    data = _HEADER.pack(len(data)) + data
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, size: int, deadline: float | None) -> bytes:
    buffer = bytearray()
    while len(buffer) < size:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError("no answer in time")
        chunk = os.read(fd, min(size - len(buffer), 1 << 20))
        if not chunk:
            raise WireError("the program's process closed the connection (it died or exited)")
        buffer += chunk
    return bytes(buffer)


def read_frame(fd: int, max_bytes: int = MAX_FRAME_BYTES, deadline: float | None = None):
    """One JSON message; its size is checked before anything is buffered."""
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    if size > max_bytes:
        raise WireError(f"message of {size} bytes exceeds the {max_bytes}-byte limit")
    try:
        return json.loads(_read_exact(fd, size, deadline))
    except (ValueError, RecursionError) as exc:
        raise WireError(f"malformed message ({type(exc).__name__})") from None


# -- values ----------------------------------------------------------------------------------


def encode(value, as_reference, depth: int = 0):
    """Plain data as tagged JSON; anything else becomes ``{"r": as_reference(value)}``."""
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if depth < _MAX_DEPTH:
        inner = depth + 1
        if kind in (list, tuple, set, frozenset):
            tag = {list: "l", tuple: "t", set: "s", frozenset: "f"}[kind]
            return {tag: [encode(item, as_reference, inner) for item in value]}
        if kind is dict:
            return {"d": [[encode(k, as_reference, inner), encode(v, as_reference, inner)]
                          for k, v in value.items()]}
        if kind in (bytes, bytearray):
            return {"b" if kind is bytes else "a": base64.b64encode(value).decode("ascii")}
        if kind is complex:
            return {"c": [value.real, value.imag]}
        if kind.__module__ == "numpy" and hasattr(value, "tolist"):
            return encode(value.tolist(), as_reference, inner)
    return {"r": as_reference(value)}


def decode(data, from_reference, depth: int = 0):
    """Rebuild a value from `encode`'s output with exact builtin types."""
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is not dict or len(data) != 1 or depth > _MAX_DEPTH + 1:
        raise WireError("malformed value")
    ((tag, body),) = data.items()
    inner = depth + 1
    try:
        if tag in ("l", "t", "s", "f") and type(body) is list:
            items = [decode(item, from_reference, inner) for item in body]
            return {"l": list, "t": tuple, "s": set, "f": frozenset}[tag](items)
        if tag == "d" and type(body) is list:
            return {decode(k, from_reference, inner): decode(v, from_reference, inner)
                    for k, v in body}
        if tag in ("b", "a") and type(body) is str:
            raw = base64.b64decode(body, validate=True)
            return raw if tag == "b" else bytearray(raw)
        if tag == "c" and type(body) is list and len(body) == 2:
            return complex(float(body[0]), float(body[1]))
        if tag == "r" and type(body) is int:
            return from_reference(body)
    except (TypeError, ValueError) as exc:  # unhashable keys, bad base64, ...
        raise WireError(f"malformed value ({type(exc).__name__})") from None
    raise WireError("malformed value")


# -- program server (runs the untrusted program; nothing it sends is trusted) ----------------


def serve(fd: int) -> None:
    """Load the program sent on `fd`, then answer the judge's requests until the socket closes."""
    # First words of a fresh interpreter, before any program code: the runner starts the load
    # deadline when it reads this.
    write_frame(fd, {"booted": True})
    program = read_frame(fd)["program"]
    namespace = {"__name__": "__solution__", "__builtins__": builtins, "__file__": "solution.py"}
    load_error = None
    try:
        exec(compile(program, "solution.py", "exec"), namespace)
    except SystemExit:
        pass  # the definitions made before it stand (spec 6.3)
    except MemoryError:
        load_error = "memory limit exceeded (MemoryError) while loading the program"
    except BaseException as exc:  # noqa: BLE001 - reported to the judge
        load_error = f"program failed to load: {type(exc).__name__}: {clip(str(exc), 120)}"
    objects: dict[int, object] = {}

    def as_reference(value) -> int:
        objects[id(value)] = value
        return id(value)

    def from_reference(key: int):
        if key not in objects:
            raise WireError(f"unknown reference {key}")
        return objects[key]

    def answer(request: dict) -> dict:
        op = request["op"]
        if op == "hello":
            return {"loaded": load_error is None, "error": load_error}
        if op == "global":
            name = request["name"]
            if name not in namespace or name.startswith("__"):
                return {"missing": True}
            return {"value": encode(namespace[name], as_reference)}
        target = from_reference(request["ref"])
        if op == "call":
            args = [decode(item, from_reference) for item in request["args"]]
            kwargs = {k: decode(v, from_reference) for k, v in request["kwargs"].items()}
            result = target(*args, **kwargs)
            # The arguments after the call, so the judge sees in-place changes (list.sort()).
            return {"value": encode(result, as_reference),
                    "args": [encode(item, as_reference) for item in args]}
        if op == "getattr":
            return {"value": encode(getattr(target, request["name"]), as_reference)}
        if op == "getitem":
            return {"value": encode(target[decode(request["key"], from_reference)], as_reference)}
        if op == "same":  # comparison of two program objects: theirs to decide
            other = from_reference(request["other"])
            return {"value": bool(target == other)}
        unary = {"len": len, "list": list, "bool": bool, "str": str, "repr": repr, "hash": hash}
        return {"value": encode(unary[op](target), as_reference)}

    while True:
        try:
            request = read_frame(fd)
        except WireError:
            return
        try:
            reply = answer(request)
        except BaseException as exc:  # noqa: BLE001 - every failure is the test's answer
            reply = {"raised": type(exc).__name__, "message": clip(str(exc), 200)}
        write_frame(fd, reply)


# -- judge side (holds the test; runs as the sandbox uid, separate from the program) ---------


class RemoteRef:
    """A program object, used by the test through requests to the program server."""

    __slots__ = ("_link", "_key")

    def __init__(self, link: "ProgramLink", key: int) -> None:
        object.__setattr__(self, "_link", link)
        object.__setattr__(self, "_key", key)

    def __call__(self, *args, **kwargs):
        return self._link.call(self, args, kwargs)

    def __getattr__(self, name: str):
        return self._link.ask("getattr", self, name=name)

    def __getitem__(self, key):
        return self._link.ask("getitem", self, key=self._link.encode_argument(key))

    def __len__(self) -> int:
        return _exact(self._link.ask("len", self), int)

    def __iter__(self):
        return iter(_exact(self._link.ask("list", self), list))

    def __contains__(self, item) -> bool:
        return item in _exact(self._link.ask("list", self), list)

    def __bool__(self) -> bool:
        return _exact(self._link.ask("bool", self), bool)

    def __str__(self) -> str:
        return _exact(self._link.ask("str", self), str)

    def __repr__(self) -> str:
        return _exact(self._link.ask("repr", self), str)

    def __hash__(self) -> int:
        return _exact(self._link.ask("hash", self), int)

    def __eq__(self, other) -> bool:
        if isinstance(other, RemoteRef):
            return _exact(self._link.ask("same", self, other=other._key), bool)
        return False  # a program object never decides equality with a test's plain value

    def __ne__(self, other) -> bool:
        return not self.__eq__(other)


def _exact(value, kind: type):
    if type(value) is not kind:
        raise TypeError(f"the program answered a {type(value).__name__} where a "
                        f"{kind.__name__} was due")
    return value


class ProgramLink:
    """The judge's end of the program server's socket."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.broken = False  # an exchange was cut off: the next reply could belong to it

    def encode_argument(self, value):
        def refuse(item) -> int:
            if isinstance(item, RemoteRef):
                return item._key
            raise TypeError(f"a {type(item).__name__} cannot be passed to the program "
                            "(plain data and the program's own objects only)")
        return encode(value, refuse)

    def request(self, message: dict) -> dict:
        if self.broken:
            raise WireError("the link to the program is broken")
        self.broken = True
        write_frame(self.fd, message)
        reply = read_frame(self.fd)
        self.broken = False
        if type(reply) is not dict:
            raise WireError("malformed reply")
        if "raised" in reply:
            _raise_program_exception(str(reply["raised"]), str(reply.get("message", "")))
        return reply

    def ask(self, op: str, target: RemoteRef, **fields):
        reply = self.request({"op": op, "ref": target._key, **fields})
        return decode(reply.get("value"), self.reference)

    def call(self, target: RemoteRef, args: tuple, kwargs: dict):
        reply = self.request({"op": "call", "ref": target._key,
                              "args": [self.encode_argument(a) for a in args],
                              "kwargs": {str(k): self.encode_argument(v)
                                         for k, v in kwargs.items()}})
        after = reply.get("args")
        if type(after) is list and len(after) == len(args):
            for before, changed in zip(args, after):
                _update_in_place(before, decode(changed, self.reference))
        return decode(reply.get("value"), self.reference)

    def reference(self, key: int) -> RemoteRef:
        return RemoteRef(self, key)


def _update_in_place(target, changed) -> None:
    if type(target) is list and type(changed) is list:
        target[:] = changed
    elif type(target) in (dict, set) and type(changed) is type(target):
        target.clear()
        target.update(changed)


def _raise_program_exception(name: str, message: str):
    if name in _PROGRAM_EXITS:
        raise ProgramExited(f"the program raised {name} during the test")
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            error = kind(message)
        except Exception:  # noqa: BLE001 - exception types that need more arguments
            error = None
        if error is not None:
            raise error
    raise ProgramError(f"{name}: {message}")


class ProgramNamespace(dict):
    """The test's globals: names the program defines resolve to its values or `RemoteRef`s."""

    def __init__(self, link: ProgramLink) -> None:
        super().__init__(__builtins__=builtins, __name__="__test__")
        self._link = link
        self._not_program = set()

    def __missing__(self, name: str):
        if name in self._not_program:
            raise KeyError(name)
        reply = self._link.request({"op": "global", "name": name})
        if reply.get("missing"):
            self._not_program.add(name)
            raise KeyError(name)
        value = decode(reply.get("value"), self._link.reference)
        self[name] = value
        return value


def judge(test_source: str, index: int, link_fd: int) -> tuple[bool, str, bool]:
    """Run one test against the program server on `link_fd`.

    Returns (passed, reason, whether the link is still in step for the next test).
    """
    link = ProgramLink(link_fd)
    namespace = ProgramNamespace(link)
    try:
        exec(compile(test_source, f"<test {index}>", "exec"), namespace)
        passed, reason = True, "passed"
    except SystemExit:  # raised by the test's own code (spec 6.3); the program's cannot get here
        passed, reason = True, "passed (SystemExit raised by the test counts as a pass)"
    except AssertionError as exc:
        passed, reason = False, "assertion failed" + (f": {clip(str(exc), 120)}"
                                                      if str(exc) else "")
    except (ProgramExited, WireError) as exc:
        passed, reason = False, clip(str(exc), 200)
    except MemoryError:
        passed, reason = False, "memory limit exceeded (MemoryError)"
    except BaseException as exc:  # noqa: BLE001
        passed, reason = False, f"runtime error: {type(exc).__name__}: {clip(str(exc), 120)}"
    return passed, reason, not link.broken

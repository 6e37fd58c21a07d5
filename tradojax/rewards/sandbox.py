"""Sandboxed execution of untrusted Python programs against tests.

The sandbox is four modules:

* this **host side** (`run_function_tests`, `run_stdio_tests`, `probe_isolation`,
  `kill_sandbox_run`), called in the trainer or a reward-pool worker; it alone holds the
  expected outputs of stdio tasks and compares them;
* the **runner** (`tradojax.rewards.sandbox_runner`), executed as ``python -I -B`` in a fresh
  interpreter started with `subprocess` (never a fork of the trainer); under ``-I`` the package
  is not on ``sys.path``, so it imports only the standard library;
* `tradojax.rewards.sandbox_rpc`: the program server and the judge of function-style tests;
* `tradojax.rewards.sandbox_os`: the /proc, libc, namespace, mount and cgroup helpers.

**The verdict comes from outside the program** (issue 16). stdio: the runner gets the inputs
only; each case runs in a fork holding the program and the runner's job without any expected
output, and the host compares a digest of the normalised stdout. function: the program runs in a
*program server*, a fresh interpreter holding the program and nothing of the job; each test runs
in a *judge* process that calls the program over a socket with plain data only and makes the
test's comparisons itself, then reports on a pipe the program does not hold (`sandbox_rpc`).

Layers of isolation (spec 10 item 19: the original ran tests in a plain subprocess):

1. The runner is started in a **new session/process group** with a **scrubbed environment**
   (trainer secrets are not inherited) and fed the job over stdin; events come back as JSON lines
   on its stdout, a channel no sandboxed process holds, read here through a bounded line reader.
2. When running as root (these machines) the runner creates the run's **cgroup** (cgroup v2 where
   this process's cgroup delegates the memory controller, else the v1 memory and pids
   hierarchies): ``SandboxLimits.run_memory_bytes`` for all of the run's processes together, no
   swap, and a process cap. It enters new **network** (no interface up: IP and abstract unix
   sockets are unreachable), **IPC** and **mount** namespaces and ``pivot_root``s into a
   read-only tmpfs holding only read-only binds of the interpreter's directories and the
   shared-library directories, /dev/null and friends, a private size-capped ``/tmp`` (the working
   directory) and a ``/proc`` in which the sandbox uid sees its own processes only: no host
   file, directory or path socket (``/run``, ``/home``, ``/etc``, the repository) is reachable.
3. Each sandboxed process drops to a **per-run uid** (``uid_base + runner pid``, unique while
   the runner lives), so it cannot signal or trace the runner, the pool or the trainer, and
   ``RLIMIT_NPROC`` counts only its own processes. The judge makes itself not dumpable, so the
   program server, which shares its uid, can neither trace it nor see it in /proc.
4. Resource limits per process: CPU time (``RLIMIT_CPU``), address space (``RLIMIT_AS``), file
   size (``RLIMIT_FSIZE``, which also caps stdout/stderr, captured in memfds), process count
   (``RLIMIT_NPROC``), open files, no core dumps; ``PR_SET_NO_NEW_PRIVS`` and a parent-death
   signal.
5. A **wall-clock** limit per test, measured by the runner from the test's own fork (interpreter
   start-up is not charged to the program: the program server's start is timed from its first
   message, which it sends before the program exists); no message from a sandboxed process moves
   a deadline. The test's processes are then killed (``kill(-1, SIGKILL)`` from a helper holding
   the uid), and the host kills the runner's group, sweeps the uid again and removes the cgroup.

When a layer is unavailable (not root, namespaces or cgroups refused, or the sandbox uid cannot
read the Python installation) the run proceeds with the remaining layers and the report says
which are missing (`ExecutionReport.degraded`, appended to reward reasons by
`tradojax.rewards.code`). Without a cgroup, memory is bounded per process only (``memory_bytes``
x ``max_processes`` for a run). Without the uid drop, ``RLIMIT_NPROC`` cannot bound a fork bomb as
root and the program could signal same-uid processes, so treat a degraded sandbox as unsafe for
untrusted code.

Linux only (memfd, prctl, namespaces, pivot_root, /proc). Known limits: what a function-style
test asks of the program's own objects is the program's to answer (see `sandbox_rpc`); and if the
trainer itself is SIGKILLed mid-run, a process the program detached with ``setsid`` may survive
(every other sandbox process dies with its parent; `RewardPool` sweeps the uid and cgroup of a
run whose worker it kills).

Test semantics (spec 6.3): ``function`` tests load the program once in a namespace whose
``__name__`` is not ``"__main__"`` and run each assert string against it, each in its own judge
with its own time limit; names the test assigns do not carry to the next test, the program's
state does (a program server that died or overran is started afresh for the next test). A
``SystemExit`` raised by the test's own code counts as a pass; one raised by the program fails
the test (the original counted it as a pass, which let ``exit()`` score). ``stdio`` tests run the
program as ``__main__`` once per case with the case's text on stdin, ``input()`` reading lines
without echoing a prompt, and pass when the whitespace-normalised stdout equals the expected
output (``SystemExit`` keeps the output; an uncaught exception fails the case).
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

from tradojax.rewards.sandbox_os import (
    clip as sandbox_clip,
    die_with_parent,
    iter_processes,
    kill_uid_processes,
    live_parents,
    remove_run_cgroup,
)

__all__ = [
    "BoundedLineReader", "DEFAULT_UID_BASE", "ExecutionReport", "SandboxLimits", "TestVerdict",
    "die_with_parent", "function_phases", "kill_sandbox_run", "kill_uid_processes",
    "list_sandbox_processes", "live_parents", "probe_isolation", "run_function_tests",
    "run_stdio_tests", "sandbox_uid",
]

_RUNNER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_runner.py")

DEFAULT_UID_BASE = 0x60000000


_PID_SPAN = 1 << 22  # Linux pid_max upper bound


_PER_TEST_OVERHEAD_S = 0.5


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one sandboxed run. Time limits per test come from the task data."""

    memory_bytes: int = 2 << 30  # RLIMIT_AS per process
    run_memory_bytes: int = 2 << 30  # all of a run's processes together (cgroup)
    output_bytes: int = 8 << 20  # RLIMIT_FSIZE: stdout, stderr and any file written
    scratch_bytes: int = 64 << 20  # size of the private /tmp (the working directory)
    max_processes: int = 32  # RLIMIT_NPROC for the run's uid
    max_open_files: int = 256  # RLIMIT_NOFILE
    stack_bytes: int = 64 << 20  # RLIMIT_STACK soft limit (deep recursion in judges' style code)
    startup_s: float = 5.0  # wall allowance for interpreter start-up, outside test limits
    isolate: bool = True  # try namespaces and the uid drop (False forces the degraded mode)
    uid_base: int = DEFAULT_UID_BASE

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "run_memory_bytes", "output_bytes", "scratch_bytes",
                     "max_processes", "max_open_files", "stack_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive int, got {value!r}")
        if self.startup_s <= 0:
            raise ValueError(f"SandboxLimits.startup_s must be > 0, got {self.startup_s!r}")
        if not 1000 <= self.uid_base <= 0x7FFFFFFF - _PID_SPAN:
            raise ValueError(f"SandboxLimits.uid_base out of range: {self.uid_base!r}")



@dataclass(frozen=True)
class TestVerdict:
    """The outcome of one test case."""

    __test__ = False  # not a pytest test class

    passed: bool
    reason: str



@dataclass
class ExecutionReport:
    """Per-test verdicts of one sandboxed run plus what the sandbox could enforce."""

    verdicts: list[TestVerdict]
    isolation: dict[str, str] = field(default_factory=dict)
    degraded: list[str] = field(default_factory=list)
    runner_error: str | None = None
    wall_s: float = 0.0

    @property
    def passed(self) -> int:
        return sum(v.passed for v in self.verdicts)

    @property
    def total(self) -> int:
        return len(self.verdicts)

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total



def run_function_tests(
    program: str,
    tests: list[str],
    time_limit_s: float,
    limits: SandboxLimits | None = None,
    on_runner_start: Callable[[int], None] | None = None,
) -> ExecutionReport:
    """Run `program`, then each assert string of `tests` in its namespace, in the sandbox.

    Each test gets `time_limit_s` of wall and CPU time (the program's own top-level code gets the
    same once). `on_runner_start(pid)` is called with the runner's pid right after it starts, so
    a supervisor that may kill the caller can also sweep the run (see `kill_sandbox_run`).
    """
    tests = list(tests)
    job = {"mode": "function", "program": program, "tests": tests}
    budget = function_phases(len(tests)) * (time_limit_s + _PER_TEST_OVERHEAD_S)
    return _run_job(job, len(tests), time_limit_s, budget, limits or SandboxLimits(),
                    on_runner_start)


def function_phases(n_tests: int) -> int:
    """Time-limited phases of a function run at worst: each test, plus a program load before
    the first test and after every test that killed the program server."""
    return 2 * n_tests + 1



def run_stdio_tests(
    program: str,
    inputs: list[str],
    outputs: list[str],
    time_limit_s: float,
    limits: SandboxLimits | None = None,
    on_runner_start: Callable[[int], None] | None = None,
) -> ExecutionReport:
    """Run `program` as ``__main__`` once per (input, expected output) pair in the sandbox."""
    inputs, outputs = list(inputs), list(outputs)
    if len(inputs) != len(outputs):
        raise ValueError(f"stdio tests need as many inputs as outputs, got {len(inputs)} inputs "
                         f"and {len(outputs)} outputs")
    # The expected outputs never leave this process: the runner reports what each case printed.
    job = {"mode": "stdio", "program": program, "inputs": inputs}
    budget = len(inputs) * (time_limit_s + _PER_TEST_OVERHEAD_S)
    return _run_job(job, len(inputs), time_limit_s, budget, limits or SandboxLimits(),
                    on_runner_start, expected_outputs=outputs)



def probe_isolation(limits: SandboxLimits | None = None) -> ExecutionReport:
    """Run a trivial program and report which isolation layers this host grants."""
    return run_stdio_tests("print(input())", ["ok"], ["ok"], 5.0, limits)



def sandbox_uid(runner_pid: int, uid_base: int = DEFAULT_UID_BASE) -> int:
    """The uid the runner with pid `runner_pid` gives its test processes."""
    return uid_base + runner_pid



def kill_sandbox_run(runner_pid: int, uid_base: int = DEFAULT_UID_BASE) -> None:
    """Kill a runner's process group and every process of its sandbox uid (for supervisors)."""
    try:
        os.killpg(runner_pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    kill_uid_processes(sandbox_uid(runner_pid, uid_base))
    remove_run_cgroup(runner_pid)



def list_sandbox_processes(uid_base: int = DEFAULT_UID_BASE) -> list[int]:
    """Pids of live (non-zombie) processes running under any sandbox uid of `uid_base`."""
    found = []
    for pid, uid, state in iter_processes():
        if uid_base <= uid < uid_base + _PID_SPAN and state not in ("Z", "X"):
            found.append(pid)
    return found



def _scrubbed_env() -> dict[str, str]:
    # Nothing from the trainer's environment reaches the program (API keys, tokens, paths).
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }



def _run_job(
    job: dict,
    n_tests: int,
    time_limit_s: float,
    test_budget_s: float,
    limits: SandboxLimits,
    on_runner_start: Callable[[int], None] | None,
    expected_outputs: list[str] | None = None,
) -> ExecutionReport:
    if not isinstance(job["program"], str):
        raise TypeError(f"program must be a str, got {type(job['program']).__name__}")
    if not (isinstance(time_limit_s, (int, float)) and time_limit_s > 0):
        raise ValueError(f"time_limit_s must be a positive number, got {time_limit_s!r}")
    started = time.monotonic()
    scratch = tempfile.mkdtemp(prefix="tradojax-sandbox-")
    job.update(
        time_limit_s=float(time_limit_s),
        limits={
            "memory_bytes": limits.memory_bytes,
            "run_memory_bytes": limits.run_memory_bytes,
            "output_bytes": limits.output_bytes,
            "scratch_bytes": limits.scratch_bytes,
            "max_processes": limits.max_processes,
            "max_open_files": limits.max_open_files,
            "stack_bytes": limits.stack_bytes,
        },
        isolate=limits.isolate,
        uid_base=limits.uid_base,
        host_pid=os.getpid(),
        scratch=scratch,
    )
    # Two parts: the runner reads the tests only after forking the program server's template.
    cases = {key: job.pop(key) for key in ("tests", "inputs") if key in job}
    first = json.dumps(job).encode("utf-8")
    payload = b"%016d" % len(first) + first + json.dumps(cases).encode("utf-8")
    deadline = started + limits.startup_s + test_budget_s + 1.0
    verdicts: dict[int, TestVerdict] = {}
    isolation: dict[str, str] = {}
    degraded: list[str] = []
    runner_error: str | None = None
    done = False
    stderr_tail = b""
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", _RUNNER_PATH],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=scratch,
            env=_scrubbed_env(),
            start_new_session=True,
            close_fds=True,
        )
    except BaseException:
        _remove_scratch(scratch)
        raise
    try:
        if on_runner_start is not None:
            on_runner_start(proc.pid)
        try:
            proc.stdin.write(payload)
            proc.stdin.close()
        except BrokenPipeError:
            runner_error = "sandbox runner exited before reading its job"
        lines = BoundedLineReader(_MAX_EVENT_BYTES)
        streams = {proc.stdout.fileno(): "out", proc.stderr.fileno(): "err"}
        while streams and not done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                runner_error = (f"sandbox wall-clock limit exceeded "
                                f"({deadline - started:.1f} s); process group killed")
                break
            ready, _, _ = select.select(list(streams), [], [], remaining)
            for fd in ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    del streams[fd]
                    continue
                if streams[fd] == "err":
                    stderr_tail = (stderr_tail + chunk)[-4096:]
                    continue
                for line in lines.feed(chunk):
                    try:
                        event = json.loads(line)
                        kind = event["event"]
                        if kind == "isolation":
                            isolation = {str(k): _clip(str(v)) for k, v in event["layers"].items()}
                            degraded = [_clip(str(d)) for d in event["degraded"]]
                        elif kind in ("verdict", "output") and 0 <= event["index"] < n_tests:
                            verdicts[event["index"]] = _verdict_of(event, expected_outputs)
                        elif kind == "done":
                            done = True
                        elif kind == "error":
                            runner_error = _clip(str(event["message"]))
                    except (ValueError, KeyError, TypeError, AttributeError):
                        runner_error = f"garbled sandbox runner output: {line[:80]!r}"
                if lines.overflowed:
                    runner_error = (f"sandbox runner sent a message over {_MAX_EVENT_BYTES} "
                                    "bytes")
                    streams.clear()
                    break
    finally:
        _reap_runner(proc, limits.uid_base)
        _remove_scratch(scratch)
    if not done and runner_error is None:
        code = proc.returncode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        detail = stderr_tail.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        runner_error = _clip(f"sandbox runner ended early ({how}) {detail[0]}".strip())
    missing_reason = runner_error or "test was not run"
    ordered = [verdicts.get(k, TestVerdict(False, missing_reason)) for k in range(n_tests)]
    return ExecutionReport(ordered, isolation, degraded, runner_error,
                           time.monotonic() - started)


# Reasons and runner messages are clipped: a program's text never reaches the caller unbounded.
_MAX_REASON_CHARS = 300
_MAX_EVENT_BYTES = 64 << 10


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_REASON_CHARS else text[:_MAX_REASON_CHARS] + "..."


class BoundedLineReader:
    """Splits a byte stream into lines in time linear in its length; a line longer than
    `max_line_bytes` sets `overflowed` and is dropped instead of buffered."""

    def __init__(self, max_line_bytes: int) -> None:
        self.buffer = bytearray()
        self.max_line_bytes = max_line_bytes
        self.overflowed = False

    def feed(self, chunk: bytes) -> list[bytes]:
        scan_from = len(self.buffer)
        self.buffer += chunk
        lines, start = [], 0
        while True:
            end = self.buffer.find(b"\n", max(start, scan_from))
            if end < 0:
                break
            lines.append(bytes(self.buffer[start:end]))
            start = end + 1
        del self.buffer[:start]
        if len(self.buffer) > self.max_line_bytes:
            self.overflowed = True
            self.buffer.clear()
        return lines


def _normalised_sha256(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def _verdict_of(event: dict, expected_outputs: list[str] | None) -> TestVerdict:
    """A function test's verdict as the runner's judge gave it, or a stdio case compared here."""
    if event["event"] == "verdict":
        return TestVerdict(event["passed"] is True, _clip(str(event["reason"])))
    if event["ok"] is not True:
        return TestVerdict(False, _clip(str(event["reason"])))
    expected = expected_outputs[event["index"]]
    if event["sha256"] == _normalised_sha256(expected):
        return TestVerdict(True, "passed")
    want = " ".join(expected.split())
    return TestVerdict(False, _clip(f"wrong answer: got {sandbox_clip(str(event['preview']))!r}, "
                                    f"expected {sandbox_clip(want)!r}"))


def _reap_runner(proc: subprocess.Popen, uid_base: int) -> None:
    # Kill the runner's group and sweep its uid *before* reaping it: until then its pid (and so
    # the uid derived from it) cannot be reused by another run.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:
        pass
    if os.geteuid() == 0:
        kill_uid_processes(sandbox_uid(proc.pid, uid_base))
        remove_run_cgroup(proc.pid)
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()



def _remove_scratch(path: str) -> None:
    # With a mount namespace the host directory stays empty; otherwise the program wrote into it
    # (possibly making read-only subdirectories).
    def make_writable_and_retry(func, target, _exc_info):
        try:
            os.chmod(os.path.dirname(target), 0o700)
            os.chmod(target, 0o700)
        except OSError:
            pass
        func(target)

    try:
        os.rmdir(path)
    except OSError:
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=make_writable_and_retry)
        else:
            shutil.rmtree(path, onerror=make_writable_and_retry)

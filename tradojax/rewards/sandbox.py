"""Sandboxed execution of untrusted Python programs against tests.

This module has two halves that share one file on purpose:

* the **host side** (`run_function_tests`, `run_stdio_tests`, `probe_isolation`,
  `kill_uid_processes`), called in the trainer or a reward-pool worker; and
* the **runner** (`_runner_main`), executed as ``python -I -B sandbox.py`` in a fresh interpreter
  started with `subprocess` (never a fork of the trainer). Under ``-I`` the package is not on
  ``sys.path``, so this file imports only the standard library.

Layers of isolation (spec 10 item 19: the original ran tests in a plain subprocess):

1. The runner is started in a **new session/process group** with a **scrubbed environment**
   (trainer secrets are not inherited) and fed the job over stdin; results come back as JSON lines
   on its stdout, a channel the tested code never holds.
2. When running as root (these machines) the runner enters new **network** (no interface is up:
   ``connect`` fails with "Network is unreachable"), **mount** and **IPC** namespaces; mounts a
   private size-capped tmpfs on ``/tmp`` (the scratch directory and working directory of the
   program), ``/var/tmp``, ``/dev/shm`` and ``/run/lock``; and hides every non-world-traversable
   ancestor of the Python installation (e.g. ``/root``) under an empty tmpfs, bind-mounting back
   only the interpreter's own directories.
3. Each test process drops to a **per-run uid** (``uid_base + runner pid``, unique while the runner
   lives), so it can write nowhere but its tmpfs, cannot signal or trace the runner, the pool or
   the trainer, cannot read other processes' environments, and ``RLIMIT_NPROC`` counts only its
   own processes. The root runner stays out of its reach.
4. Resource limits per test process: CPU time (``RLIMIT_CPU``), address space (``RLIMIT_AS``),
   file size (``RLIMIT_FSIZE``, which also caps stdout/stderr, captured in memfds), process count
   (``RLIMIT_NPROC``), open files, no core dumps; ``PR_SET_NO_NEW_PRIVS`` and a parent-death
   signal.
5. A **wall-clock** limit per test, measured from the test's own fork (interpreter start-up is not
   charged to the program, fixing the original's stdio rule), after which the test's process
   group is killed; after every test all processes of the run's uid are killed
   (``kill(-1, SIGKILL)`` from a helper holding that uid), and the host kills the runner's
   group and sweeps the uid again, so nothing outlives a run.

When a layer is unavailable (not root, namespaces refused, or the sandbox uid cannot read the
Python installation) the run proceeds with the remaining layers and the report says which are
missing (`ExecutionReport.degraded`, appended to reward reasons by `tradojax.rewards.code`).
Without the uid drop, ``RLIMIT_NPROC`` cannot bound a fork bomb as root and the program could
signal same-uid processes, so treat a degraded sandbox as unsafe for untrusted code.

Linux only (memfd, prctl, namespaces, /proc). Known limits: the sandbox protects the host, not
the verdict against code written to forge it (a program could, in principle, write a fake
verdict to the inherited result pipe); world-readable files stay readable; and if the trainer
itself is SIGKILLed mid-run, a process the program detached with ``setsid`` may survive (every
other sandbox process dies with its parent; `RewardPool` sweeps the uid of a run whose worker
it kills).

Test semantics (spec 6.3): ``function`` tests execute the program once in a namespace whose
``__name__`` is not ``"__main__"``, then each assert string in that namespace, each in its own
forked copy with its own time limit (``SystemExit`` counts as a pass); ``stdio`` tests run the
program as ``__main__`` once per case with the case's text on stdin, ``input()`` reading lines
without echoing a prompt, and pass when the whitespace-normalised stdout equals the expected
output (``SystemExit`` keeps the output; an uncaught exception fails the case).
"""

from __future__ import annotations

import builtins
import ctypes
import io
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

try:  # Unix only; the runner needs it, the host side only uses it for the isolation path.
    import resource
except ImportError:  # pragma: no cover - non-POSIX hosts cannot run the sandbox at all
    resource = None  # type: ignore[assignment]

# Sandbox uids are UID_BASE + runner pid: above any real account, below 2**31.
DEFAULT_UID_BASE = 0x60000000
_PID_SPAN = 1 << 22  # Linux pid_max upper bound

# Linux constants (linux/sched.h, linux/mount.h, linux/prctl.h).
_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38

# Directories any uid may write to on a typical Linux host; each gets a private tmpfs.
_WORLD_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")

_SOLUTION_FILENAME = "solution.py"
# Extra wall time granted per test for fork/wait/bookkeeping in the runner.
_PER_TEST_OVERHEAD_S = 0.5


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one sandboxed run. Time limits per test come from the task data."""

    memory_bytes: int = 2 << 30  # RLIMIT_AS per process
    output_bytes: int = 8 << 20  # RLIMIT_FSIZE: stdout, stderr and any file written
    scratch_bytes: int = 64 << 20  # size of the private /tmp (the working directory)
    max_processes: int = 32  # RLIMIT_NPROC for the run's uid
    max_open_files: int = 256  # RLIMIT_NOFILE
    stack_bytes: int = 64 << 20  # RLIMIT_STACK soft limit (deep recursion in judges' style code)
    startup_s: float = 5.0  # wall allowance for interpreter start-up, outside test limits
    isolate: bool = True  # try namespaces and the uid drop (False forces the degraded mode)
    uid_base: int = DEFAULT_UID_BASE

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "output_bytes", "scratch_bytes", "max_processes",
                     "max_open_files", "stack_bytes"):
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
    budget = (len(tests) + 1) * (time_limit_s + _PER_TEST_OVERHEAD_S)
    return _run_job(job, len(tests), time_limit_s, budget, limits or SandboxLimits(),
                    on_runner_start)


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
    job = {"mode": "stdio", "program": program, "inputs": inputs, "outputs": outputs}
    budget = len(inputs) * (time_limit_s + _PER_TEST_OVERHEAD_S)
    return _run_job(job, len(inputs), time_limit_s, budget, limits or SandboxLimits(),
                    on_runner_start)


def probe_isolation(limits: SandboxLimits | None = None) -> ExecutionReport:
    """Run a trivial program and report which isolation layers this host grants."""
    return run_stdio_tests("print(input())", ["ok"], ["ok"], 5.0, limits)


def sandbox_uid(runner_pid: int, uid_base: int = DEFAULT_UID_BASE) -> int:
    """The uid the runner with pid `runner_pid` gives its test processes."""
    return uid_base + runner_pid


def kill_uid_processes(uid: int, max_rounds: int = 200) -> int:
    """SIGKILL every live process whose real uid is `uid` (repeating until none is left).

    Returns how many kill signals were sent. Needs permission to signal them (root).
    """
    sent = 0
    for _ in range(max_rounds):
        victims = _live_pids_of_uid(uid)
        if not victims:
            return sent
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
                sent += 1
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.001)
    return sent


def kill_sandbox_run(runner_pid: int, uid_base: int = DEFAULT_UID_BASE) -> None:
    """Kill a runner's process group and every process of its sandbox uid (for supervisors)."""
    try:
        os.killpg(runner_pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    kill_uid_processes(sandbox_uid(runner_pid, uid_base))


def list_sandbox_processes(uid_base: int = DEFAULT_UID_BASE) -> list[int]:
    """Pids of live (non-zombie) processes running under any sandbox uid of `uid_base`."""
    found = []
    for pid, uid, state in _iter_processes():
        if uid_base <= uid < uid_base + _PID_SPAN and state not in ("Z", "X"):
            found.append(pid)
    return found


def _iter_processes():
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as handle:
                text = handle.read(4096).decode("ascii", "replace")
        except OSError:
            continue
        uid, state = -1, "?"
        for line in text.splitlines():
            if line.startswith("State:"):
                state = line.split()[1]
            elif line.startswith("Uid:"):
                uid = int(line.split()[1])
                break
        yield int(name), uid, state


def _live_pids_of_uid(uid: int) -> list[int]:
    return [pid for pid, puid, state in _iter_processes()
            if puid == uid and state not in ("Z", "X")]


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when the thread that started it exits (Linux).

    Returns False where unsupported. Used by reward-pool workers so they never outlive the
    trainer.
    """
    try:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        return True
    except (OSError, AttributeError):
        return False


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
    payload = json.dumps(job).encode("utf-8")
    deadline = started + limits.startup_s + test_budget_s + 1.0
    verdicts: dict[int, TestVerdict] = {}
    isolation: dict[str, str] = {}
    degraded: list[str] = []
    runner_error: str | None = None
    done = False
    stderr_tail = b""
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", os.path.abspath(__file__)],
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
        buffer = b""
        streams = {proc.stdout.fileno(): "out", proc.stderr.fileno(): "err"}
        while streams:
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
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    try:
                        event = json.loads(line)
                        kind = event["event"]
                    except (ValueError, KeyError, TypeError):
                        runner_error = f"garbled sandbox runner output: {line[:80]!r}"
                        continue
                    if kind == "isolation":
                        isolation = event["layers"]
                        degraded = event["degraded"]
                    elif kind == "verdict":
                        verdicts[event["index"]] = TestVerdict(event["passed"], event["reason"])
                    elif kind == "done":
                        done = True
                    elif kind == "error":
                        runner_error = event["message"]
    finally:
        _reap_runner(proc, limits.uid_base)
        _remove_scratch(scratch)
    if not done and runner_error is None:
        code = proc.returncode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        detail = stderr_tail.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        runner_error = f"sandbox runner ended early ({how}) {detail[0]}".strip()
    missing_reason = runner_error or "test was not run"
    ordered = [verdicts.get(k, TestVerdict(False, missing_reason)) for k in range(n_tests)]
    return ExecutionReport(ordered, isolation, degraded, runner_error,
                           time.monotonic() - started)


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


# --------------------------------------------------------------------------------------------
# Runner (executed as __main__ in a fresh `python -I -B` interpreter)
# --------------------------------------------------------------------------------------------

_libc_handle = None


def _libc():
    global _libc_handle
    if _libc_handle is None:
        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option: int, value: int) -> None:
    _check(_libc().prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                         ctypes.c_ulong(0)), f"prctl({option})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


def _unshare(flags: int) -> None:
    _check(_libc().unshare(ctypes.c_int(flags)), "unshare")


class _Emitter:
    """Writes JSON-line events on the runner's private result channel."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def emit(self, **event) -> None:
        data = (json.dumps(event) + "\n").encode("utf-8")
        while data:
            data = data[os.write(self.fd, data):]


def _interpreter_paths() -> list[str]:
    """Directories the tested code needs to read: the interpreter, stdlib and site-packages."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  os.path.dirname(os.path.realpath(sys.executable))}
    candidates.update(p for p in sys.path if p and os.path.isdir(p))
    real = sorted({os.path.realpath(p) for p in candidates if os.path.isdir(p)})
    # Keep only outermost directories.
    kept: list[str] = []
    for path in real:
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def _first_untraversable_dir(path: str) -> str | None:
    current = ""
    for part in path.strip("/").split("/"):
        current += "/" + part
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current
    return None


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _cover_with_tmpfs(cover: str, tmpfs_options: str, keep_visible: list[str]) -> None:
    """Mount an empty tmpfs on `cover`, bind-mounting back the `keep_visible` paths inside it."""
    inside = [p for p in keep_visible if _under(p, cover) and p != cover]
    handles = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in inside}
    try:
        _mount("tmpfs", cover, "tmpfs", _MS_NOSUID | _MS_NODEV, tmpfs_options)
        for path, handle in handles.items():
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{handle}", path, None, _MS_BIND | _MS_REC)
    finally:
        for handle in handles.values():
            os.close(handle)


def _drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


def _await_exit(pid: int, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for child `pid` to exit, leaving it unreaped (so its pid, and the
    process group named after it, cannot be reused before we kill the group)."""
    deadline = time.monotonic() + timeout_s
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while True:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if pidfd is not None:
                select.select([pidfd], [], [], remaining)
            else:
                time.sleep(min(0.002, remaining))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _kill_group_and_reap(pid: int) -> int:
    """SIGKILL the process group led by child `pid`, then reap `pid`; its wait status."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return os.waitpid(pid, 0)[1]


def _describe_status(status: int, output_bytes: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXFSZ:
            return f"output limit exceeded ({output_bytes} bytes)"
        if sig == signal.SIGXCPU:
            return "CPU time limit exceeded"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by signal {name}"
    return f"exit code {os.WEXITSTATUS(status)}"


class _Runner:
    """Sets up isolation as root and runs each test in a forked, uid-dropped child."""

    def __init__(self, job: dict, emitter: _Emitter) -> None:
        self.job = job
        self.emitter = emitter
        self.limits = job["limits"]
        self.time_limit = float(job["time_limit_s"])
        self.uid: int | None = None
        self.layers: dict[str, str] = {}
        self.degraded: list[str] = []
        self.devnull = os.open(os.devnull, os.O_RDWR)

    # -- isolation -----------------------------------------------------------------------
    def isolate(self) -> None:
        """Enter namespaces, build the private filesystem view and choose the test uid."""
        scratch_fd = os.open(self.job["scratch"], os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fchdir(scratch_fd)
            if not self.job["isolate"]:
                self._degrade("all", "isolation disabled by configuration "
                                     "(SandboxLimits.isolate=False)")
                return
            if os.geteuid() != 0:
                self._degrade("all", "not running as root: no namespaces and no uid drop")
                return
            candidate_uid = int(self.job["uid_base"]) + os.getpid()
            try:
                _unshare(_CLONE_NEWNET)
                self.layers["network"] = "isolated (new network namespace, no interface up)"
            except OSError as exc:
                self._degrade("network", f"network namespace refused ({exc.strerror})")
            try:
                _unshare(_CLONE_NEWIPC)
            except OSError:
                pass
            needed = _interpreter_paths()
            try:
                self._private_filesystem(needed)
            except OSError as exc:
                self._degrade("filesystem", f"private mounts refused ({exc.strerror}); the "
                                            "program can write wherever its uid may")
                os.fchdir(scratch_fd)
                try:
                    os.chown(".", candidate_uid, candidate_uid)
                except OSError:
                    pass
            problem = self._probe_uid(candidate_uid, needed)
            if problem is None:
                self.uid = candidate_uid
                self.layers["uid"] = f"tests run as uid {candidate_uid}"
                self.layers["processes"] = (f"RLIMIT_NPROC={self.limits['max_processes']} "
                                            "for that uid")
            else:
                self._degrade("uid", f"uid drop unusable ({problem}); tests run as root, so "
                                     "RLIMIT_NPROC is not enforced")
        finally:
            os.close(scratch_fd)

    def _private_filesystem(self, needed: list[str]) -> None:
        _unshare(_CLONE_NEWNS)
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
        size = self.limits["scratch_bytes"]
        _cover_with_tmpfs("/tmp", f"size={size},mode=1777", needed)
        os.chdir("/tmp")
        for extra in _WORLD_WRITABLE_DIRS[1:]:
            if os.path.isdir(extra) and not os.path.islink(extra):
                _cover_with_tmpfs(extra, f"size={min(size, 16 << 20)},mode=1777", needed)
        blocked = sorted({b for p in needed if (b := _first_untraversable_dir(p))
                          and b != p and not _under(b, "/tmp")})
        hidden = [b for b in blocked if not any(_under(b, o) for o in blocked if o != b)]
        for cover in hidden:
            _cover_with_tmpfs(cover, "size=1m,mode=0755", needed)
        self.layers["filesystem"] = (
            "isolated (private mount namespace; private tmpfs on /tmp as working directory; "
            f"hidden: {', '.join(hidden) or 'nothing'})")

    def _degrade(self, layer: str, message: str) -> None:
        self.layers[layer] = "NOT isolated: " + message
        self.degraded.append(message)

    def _probe_uid(self, uid: int, needed: list[str]) -> str | None:
        pid = os.fork()
        if pid == 0:
            code = 4
            try:
                _drop_privileges(uid)
                code = 3
                if all(os.access(p, os.R_OK | os.X_OK) for p in needed):
                    code = 2
                    probe = os.open(".sandbox-probe", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
                    os.close(probe)
                    os.unlink(".sandbox-probe")
                    code = 0
            finally:
                os._exit(code)
        if not _await_exit(pid, 5.0):
            _kill_group_and_reap(pid)
            return "probe timed out"
        status = os.waitpid(pid, 0)[1]
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
        return {0: None, 2: "working directory not writable by the sandbox uid",
                3: "the Python installation is not readable by the sandbox uid",
                4: "setresuid refused"}.get(code, f"probe failed ({code})")

    # -- per-process set-up in a forked child ---------------------------------------------
    def _enter_child(self, stdin_fd: int, stdout_fd: int, stderr_fd: int,
                     keep_fd: int | None = None) -> None:
        """Turn a freshly forked child into a sandboxed test process."""
        os.setpgid(0, 0)
        for fd_target, fd_source in ((0, stdin_fd), (1, stdout_fd), (2, stderr_fd)):
            os.dup2(fd_source, fd_target)
        first_free = 3
        if keep_fd is not None:
            os.dup2(keep_fd, 3)
            first_free = 4
        for name in os.listdir("/proc/self/fd"):
            if int(name) >= first_free:
                try:
                    os.close(int(name))
                except OSError:
                    pass
        if self.uid is not None:
            _drop_privileges(self.uid)
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
        limits = self.limits
        cpu = int(self.time_limit) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits["output_bytes"], limits["output_bytes"]))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        nofile = min(limits["max_open_files"], resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        stack_hard = resource.getrlimit(resource.RLIMIT_STACK)[1]
        stack = limits["stack_bytes"]
        if stack_hard != resource.RLIM_INFINITY:
            stack = min(stack, stack_hard)
        resource.setrlimit(resource.RLIMIT_STACK, (stack, stack_hard))
        nproc = limits["max_processes"]
        if self.uid is None and os.geteuid() != 0:
            # Without a private uid the count includes the user's other processes.
            nproc += _count_processes_of_uid(os.getuid())
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        for sig in (signal.SIGXFSZ, signal.SIGPIPE, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        sys.stdin = sys.__stdin__ = io.TextIOWrapper(
            io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8",
            errors="replace")
        sys.stdout = sys.__stdout__ = io.TextIOWrapper(
            io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8",
            errors="replace")
        sys.stderr = sys.__stderr__ = io.TextIOWrapper(
            io.BufferedWriter(io.FileIO(2, "w", closefd=False)), encoding="utf-8",
            errors="replace", line_buffering=True)
        sys.argv = [_SOLUTION_FILENAME]
        builtins.input = _input_without_prompt

    def _kill_leftovers(self) -> None:
        """Kill every process of the run's uid and every child of the runner; reap them."""
        if self.uid is not None:
            helper = os.fork()
            if helper == 0:
                try:
                    os.setresuid(self.uid, self.uid, self.uid)
                    # kill(-1) reaches every process this uid may signal, except the caller;
                    # the kernel holds off forks while it runs, so a fork bomb cannot outpace it.
                    os.kill(-1, signal.SIGKILL)
                    os.kill(-1, signal.SIGKILL)
                finally:
                    os._exit(0)
            os.waitpid(helper, 0)
        _kill_and_reap_children()

    # -- stdio ------------------------------------------------------------------------------
    def run_stdio(self) -> None:
        """Run every stdio case and emit its verdict."""
        program = self.job["program"]
        for index, (stdin_text, expected) in enumerate(zip(self.job["inputs"],
                                                           self.job["outputs"])):
            passed, reason = self._run_stdio_case(program, stdin_text, expected)
            self.emitter.emit(event="verdict", index=index, passed=passed, reason=reason)

    def _run_stdio_case(self, program: str, stdin_text: str, expected: str) -> tuple[bool, str]:
        stdin_fd = os.memfd_create("stdin")
        stdout_fd = os.memfd_create("stdout")
        stderr_fd = os.memfd_create("stderr")
        try:
            data = stdin_text.encode("utf-8")
            while data:
                data = data[os.write(stdin_fd, data):]
            os.lseek(stdin_fd, 0, os.SEEK_SET)
            pid = os.fork()
            if pid == 0:
                _child_run(lambda: self._enter_child(stdin_fd, stdout_fd, stderr_fd),
                           lambda: _exec_stdio_program(program))
            exited = _await_exit(pid, self.time_limit)
            status = _kill_group_and_reap(pid)
            self._kill_leftovers()
            if not exited:
                return False, f"time limit exceeded ({self.time_limit:g} s wall)"
            out_limit = self.limits["output_bytes"]
            if os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0:
                return False, _failure_reason(status, stderr_fd, out_limit)
            output = os.pread(stdout_fd, out_limit + 1, 0).decode("utf-8", "replace")
            got, want = " ".join(output.split()), " ".join(expected.split())
            if got == want:
                return True, "passed"
            return False, f"wrong answer: got {_clip(got)!r}, expected {_clip(want)!r}"
        finally:
            for fd in (stdin_fd, stdout_fd, stderr_fd):
                os.close(fd)

    # -- function ---------------------------------------------------------------------------
    def run_function(self) -> None:
        """Run the program once in a zygote process, each assert in a fork of it."""
        tests = self.job["tests"]
        stdout_fd = os.memfd_create("stdout")
        stderr_fd = os.memfd_create("stderr")
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            _child_run(lambda: self._enter_child(self.devnull, stdout_fd, stderr_fd,
                                                 keep_fd=write_end),
                       lambda: _zygote(self.job["program"], tests, self.time_limit,
                                       self.limits["output_bytes"]))
        os.close(write_end)
        results: dict[int, tuple[bool, str]] = {}
        statuses: dict[int, str] = {}
        failure: str | None = None
        loaded = False
        buffer = b""
        # The zygote enforces each limit itself; this deadline only catches a stuck zygote.
        slack = 1.0
        deadline = time.monotonic() + self.time_limit + slack
        try:
            while len(statuses) < len(tests) and failure is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    failure = ("sandbox process stopped responding" if loaded else
                               f"time limit exceeded ({self.time_limit:g} s wall) while "
                               "loading the program")
                    break
                ready, _, _ = select.select([read_end], [], [], remaining)
                if not ready:
                    continue
                chunk = os.read(read_end, 1 << 16)
                if not chunk:
                    failure = "the program's process died"
                    if _await_exit(pid, 0.5):
                        failure += f" ({_describe_status(os.waitpid(pid, 0)[1], 0)})"
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    try:
                        msg = json.loads(line)
                        kind = msg["kind"]
                    except (ValueError, KeyError, TypeError):
                        continue  # garbage written by the tested code
                    if kind == "ready":
                        loaded = True
                        deadline = time.monotonic() + self.time_limit + slack
                    elif kind == "setup_failed":
                        failure = str(msg.get("reason", "program failed to load"))
                    elif kind == "verdict" and isinstance(msg.get("index"), int):
                        results.setdefault(msg["index"], (bool(msg.get("passed")),
                                                          str(msg.get("reason"))))
                    elif kind == "status" and isinstance(msg.get("index"), int):
                        statuses[msg["index"]] = str(msg.get("outcome"))
                        deadline = time.monotonic() + self.time_limit + slack
        finally:
            os.close(read_end)
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self._kill_leftovers()
            for fd in (stdout_fd, stderr_fd):
                os.close(fd)
        for index in range(len(tests)):
            outcome = statuses.get(index)
            if outcome == "exited" and index in results:
                passed, reason = results[index]
            elif outcome is not None and outcome != "exited":
                passed, reason = False, outcome
            else:
                passed, reason = False, failure or "test was not run"
            self.emitter.emit(event="verdict", index=index, passed=passed, reason=reason)


def _count_processes_of_uid(uid: int) -> int:
    return sum(1 for _, puid, state in _iter_processes() if puid == uid and state != "Z")


def live_parents() -> dict[int, int]:
    """{pid: parent pid} of every live (not zombie or dead) process, from /proc."""
    parent_of = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in (b"Z", b"X"):
            parent_of[int(name)] = int(fields[1])
    return parent_of


def _children_of(parent: int) -> list[int]:
    return [pid for pid, ppid in live_parents().items() if ppid == parent]


def _kill_and_reap_children(timeout_s: float = 2.0) -> None:
    """SIGKILL and reap every child of this process (orphans come here: we are a subreaper)."""
    deadline = time.monotonic() + timeout_s
    me = os.getpid()
    while time.monotonic() < deadline:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                break
        for child in _children_of(me):
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.001)


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _failure_reason(status: int, stderr_fd: int, output_bytes: int) -> str:
    if os.WIFSIGNALED(status):
        return _describe_status(status, output_bytes)
    size = os.fstat(stderr_fd).st_size
    tail = os.pread(stderr_fd, 1 << 16, max(0, size - (1 << 16)))
    lines = [ln for ln in tail.decode("utf-8", "replace").splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else _describe_status(status, output_bytes)
    if last.startswith("MemoryError"):
        return "memory limit exceeded (MemoryError)"
    return "runtime error: " + _clip(last)


def _input_without_prompt(prompt: object = None) -> str:
    # The original replaced input() by a line iterator: prompts are not echoed to stdout.
    line = sys.stdin.readline()
    if not line:
        raise EOFError("EOF when reading a line")
    return line[:-1] if line.endswith("\n") else line


def _child_run(enter: Callable[[], None], body: Callable[[], int]) -> None:
    """In a forked child: enter the sandbox, run `body`, and never return to runner code."""
    code = 70
    try:
        enter()
        code = 71
        code = body()
    except BaseException:  # noqa: BLE001 - the child must exit, whatever happened
        try:
            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        os._exit(code)


def _exec_stdio_program(program: str) -> int:
    namespace = {"__name__": "__main__", "__builtins__": builtins, "__file__": _SOLUTION_FILENAME}
    status = 0
    try:
        exec(compile(program, _SOLUTION_FILENAME, "exec"), namespace)
    except SystemExit:
        pass  # the output printed so far counts
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        status = 1
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001
        status = 1
    return status


def _zygote(program: str, tests: list[str], time_limit: float, output_bytes: int) -> int:
    """Run the program once, then fork one child per assert (fd 3 is the verdict pipe)."""
    # Bind what we need before the tested code can rebind module attributes.
    fork, waitpid, killpg, write, setpgid = os.fork, os.waitpid, os.killpg, os.write, os.setpgid
    ftruncate, lseek, exit_now, dumps = os.ftruncate, os.lseek, os._exit, json.dumps
    await_exit, describe = _await_exit, _describe_status

    def send(**msg) -> None:
        data = (dumps(msg) + "\n").encode("utf-8")
        while data:
            data = data[write(3, data):]

    namespace = {"__name__": "__solution__", "__builtins__": builtins,
                 "__file__": _SOLUTION_FILENAME}
    try:
        exec(compile(program, _SOLUTION_FILENAME, "exec"), namespace)
    except SystemExit:
        pass
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, MemoryError):
            reason = "memory limit exceeded (MemoryError) while loading the program"
        else:
            reason = f"program failed to load: {type(exc).__name__}: {_clip(str(exc))}"
        send(kind="setup_failed", reason=reason)
        return 0
    send(kind="ready")
    for index, test_source in enumerate(tests):
        child = fork()
        if child == 0:
            setpgid(0, 0)
            for fd in (1, 2):  # each test gets the whole output allowance
                ftruncate(fd, 0)
                lseek(fd, 0, os.SEEK_SET)
            try:
                exec(compile(test_source, f"<test {index}>", "exec"), namespace)
                passed, reason = True, "passed"
            except SystemExit:
                passed, reason = True, "passed (SystemExit counts as a pass)"
            except AssertionError as exc:
                passed = False
                reason = "assertion failed" + (f": {_clip(str(exc))}" if str(exc) else "")
            except MemoryError:
                passed, reason = False, "memory limit exceeded (MemoryError)"
            except BaseException as exc:  # noqa: BLE001
                passed, reason = False, f"runtime error: {type(exc).__name__}: {_clip(str(exc))}"
            try:
                sys.stdout.flush()
            except BaseException:  # noqa: BLE001
                pass
            send(kind="verdict", index=index, passed=passed, reason=reason)
            exit_now(0)
        exited = await_exit(child, time_limit)
        try:
            killpg(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        status = waitpid(child, 0)[1]
        if not exited:
            outcome = f"time limit exceeded ({time_limit:g} s wall)"
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            outcome = "exited"
        else:
            outcome = describe(status, output_bytes)
        send(kind="status", index=index, outcome=outcome)
    return 0


def _runner_main() -> int:
    """Entry point of the runner process: read the job, isolate, run tests, report."""
    raw = sys.stdin.buffer.read()
    # Private result channel; fds 0 and 1 become /dev/null so nothing else writes results.
    result_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    emitter = _Emitter(result_fd)
    try:
        job = json.loads(raw)
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != job["host_pid"]:
            return 1  # the host died before we could arrange to die with it
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        runner = _Runner(job, emitter)
        runner.isolate()
        emitter.emit(event="isolation", layers=runner.layers, degraded=runner.degraded,
                     uid=runner.uid)
        if job["mode"] == "stdio":
            runner.run_stdio()
        else:
            runner.run_function()
        emitter.emit(event="done")
        return 0
    except Exception as exc:  # noqa: BLE001 - report any runner failure to the host
        emitter.emit(event="error", message=f"sandbox runner failed: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(_runner_main())

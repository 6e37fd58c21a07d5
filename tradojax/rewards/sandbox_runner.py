"""The sandbox runner: executed as ``python -I -B sandbox_runner.py`` by `sandbox._run_job`.

A fresh interpreter (never a fork of the trainer); under ``-I`` the package is not on
``sys.path``, so this file imports only the standard library and loads `sandbox_os` by path.
See `tradojax.rewards.sandbox` for the layers of isolation and the test semantics.
"""

from __future__ import annotations

import builtins
import importlib.util
import io
import json
import os
import select
import signal
import stat
import sys
import time
import traceback
from typing import Callable

import resource


def _load_sibling(name: str):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")
    spec = importlib.util.spec_from_file_location("tradojax_" + name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    sandbox_os = _load_sibling("sandbox_os")
else:  # imported from the package (tests, tooling)
    from tradojax.rewards import sandbox_os

# Directories any uid may write to on a typical Linux host; each gets a private tmpfs.
_WORLD_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_SOLUTION_FILENAME = "solution.py"


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
        sandbox_os.mount("tmpfs", cover, "tmpfs", sandbox_os.MS_NOSUID | sandbox_os.MS_NODEV, tmpfs_options)
        for path, handle in handles.items():
            os.makedirs(path, mode=0o755, exist_ok=True)
            sandbox_os.mount(f"/proc/self/fd/{handle}", path, None, sandbox_os.MS_BIND | sandbox_os.MS_REC)
    finally:
        for handle in handles.values():
            os.close(handle)


def _drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    sandbox_os.prctl(sandbox_os.PR_SET_NO_NEW_PRIVS, 1)


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
                sandbox_os.unshare(sandbox_os.CLONE_NEWNET)
                self.layers["network"] = "isolated (new network namespace, no interface up)"
            except OSError as exc:
                self._degrade("network", f"network namespace refused ({exc.strerror})")
            try:
                sandbox_os.unshare(sandbox_os.CLONE_NEWIPC)
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
        sandbox_os.unshare(sandbox_os.CLONE_NEWNS)
        sandbox_os.mount(None, "/", None, sandbox_os.MS_REC | sandbox_os.MS_PRIVATE)
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
        if not sandbox_os.await_exit(pid, 5.0):
            sandbox_os.kill_group_and_reap(pid)
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
        sandbox_os.prctl(sandbox_os.PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
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
            nproc += sandbox_os.count_processes_of_uid(os.getuid())
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
        sandbox_os.kill_and_reap_children()

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
            exited = sandbox_os.await_exit(pid, self.time_limit)
            status = sandbox_os.kill_group_and_reap(pid)
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
            return False, f"wrong answer: got {sandbox_os.clip(got)!r}, expected {sandbox_os.clip(want)!r}"
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
                    if sandbox_os.await_exit(pid, 0.5):
                        failure += f" ({sandbox_os.describe_status(os.waitpid(pid, 0)[1], 0)})"
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


def _failure_reason(status: int, stderr_fd: int, output_bytes: int) -> str:
    if os.WIFSIGNALED(status):
        return sandbox_os.describe_status(status, output_bytes)
    size = os.fstat(stderr_fd).st_size
    tail = os.pread(stderr_fd, 1 << 16, max(0, size - (1 << 16)))
    lines = [ln for ln in tail.decode("utf-8", "replace").splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else sandbox_os.describe_status(status, output_bytes)
    if last.startswith("MemoryError"):
        return "memory limit exceeded (MemoryError)"
    return "runtime error: " + sandbox_os.clip(last)


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
    await_exit, describe = sandbox_os.await_exit, sandbox_os.describe_status

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
            reason = f"program failed to load: {type(exc).__name__}: {sandbox_os.clip(str(exc))}"
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
                reason = "assertion failed" + (f": {sandbox_os.clip(str(exc))}" if str(exc) else "")
            except MemoryError:
                passed, reason = False, "memory limit exceeded (MemoryError)"
            except BaseException as exc:  # noqa: BLE001
                passed, reason = False, f"runtime error: {type(exc).__name__}: {sandbox_os.clip(str(exc))}"
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
        sandbox_os.prctl(sandbox_os.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != job["host_pid"]:
            return 1  # the host died before we could arrange to die with it
        sandbox_os.prctl(sandbox_os.PR_SET_CHILD_SUBREAPER, 1)
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

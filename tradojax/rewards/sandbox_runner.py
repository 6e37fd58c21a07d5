"""The sandbox runner: executed as ``python -I -B sandbox_runner.py`` by `sandbox._run_job`.

A fresh interpreter (never a fork of the trainer), root on these machines; under ``-I`` the
package is not on ``sys.path``, so this file imports only the standard library and loads its
siblings `sandbox_os` and `sandbox_rpc` by path. It is trusted: tested code runs only in its
children, under another uid, and reaches it through nothing but exit statuses and the program
server's socket. It reports to the host as JSON lines on its stdout, which no child holds.

* **stdio**: the runner receives the inputs only (the host keeps the expected outputs); each
  case runs in a fork of the runner, and the runner sends back a digest and a short preview of
  the whitespace-normalised stdout for the host to compare.
* **function**: the program runs in a program server, forked from a template the runner forks
  before it reads the tests (so the server's memory never holds one), and each test in a judge
  process (see `sandbox_rpc`); the judge's verdict comes on a pipe the program does not hold. A
  server that dies or overruns a test is replaced for the next test (the program is loaded
  again).

See `tradojax.rewards.sandbox` for the isolation layers.
"""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import importlib.util
import io
import json
import os
import resource
import signal
import socket
import sys
import time
import traceback
from typing import Callable

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"tradojax_{name}",
                                                  os.path.join(_HERE, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    sandbox_os = _load_sibling("sandbox_os")
    sandbox_rpc = _load_sibling("sandbox_rpc")
else:  # imported from the package (tests, tooling)
    from tradojax.rewards import sandbox_os, sandbox_rpc

_SOLUTION_FILENAME = "solution.py"
_PREVIEW_CHARS = 120
_MAX_VERDICT_BYTES = 4096
_DEV_FILES = ("null", "zero", "full", "random", "urandom")
# Shared-library directories the interpreter and extension modules load from.
_LIBRARY_DIRS = ("/lib", "/lib64", "/lib32", "/usr/lib", "/usr/lib64", "/usr/lib32")
_LIBRARY_FILES = ("/etc/ld.so.cache",)
_SERVER_BOOT_S = 5.0  # start-up of a program server, not charged to the program
_JOB_HEADER_BYTES = 16  # decimal size of the job's first part
_LOAD_SLACK_S = 0.5


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
    kept: list[str] = []  # outermost directories only
    for path in real:
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def _drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    sandbox_os.prctl(sandbox_os.PR_SET_NO_NEW_PRIVS, 1)


def _bind(source: str, target: str, read_only: bool) -> None:
    sandbox_os.mount(source, target, None, sandbox_os.MS_BIND | sandbox_os.MS_REC)
    if read_only:
        sandbox_os.mount(None, target, None, sandbox_os.MS_BIND | sandbox_os.MS_REMOUNT
                         | sandbox_os.MS_RDONLY | sandbox_os.MS_NOSUID | sandbox_os.MS_NODEV)


def _make_mount_point(root: str, path: str, is_dir: bool) -> str:
    target = root + path
    os.makedirs(target if is_dir else os.path.dirname(target), mode=0o755, exist_ok=True)
    if not is_dir and not os.path.exists(target):
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
    return target


class _Runner:
    """Sets up isolation as root and runs each test in forked, uid-dropped children."""

    def __init__(self, job: dict, emitter: _Emitter) -> None:
        self.job = job
        self.emitter = emitter
        self.limits = job["limits"]
        self.time_limit = float(job["time_limit_s"])
        self.uid: int | None = None
        self.cgroup = None
        self.layers: dict[str, str] = {}
        self.degraded: list[str] = []
        self.devnull = os.open(os.devnull, os.O_RDWR)
        self.template: tuple[int, socket.socket] | None = None

    # -- isolation -----------------------------------------------------------------------
    def isolate(self) -> None:
        """Create the run's cgroup, enter namespaces, pivot into a bare root, pick the uid."""
        os.chdir(self.job["scratch"])
        if not self.job["isolate"]:
            self._degrade("all", "isolation disabled by configuration "
                                 "(SandboxLimits.isolate=False)")
            return
        if os.geteuid() != 0:
            self._degrade("all", "not running as root: no namespaces, cgroup or uid drop")
            return
        candidate_uid = int(self.job["uid_base"]) + os.getpid()
        self._join_cgroup()
        try:
            sandbox_os.unshare(sandbox_os.CLONE_NEWNET)
            self.layers["network"] = "isolated (new network namespace, no interface up)"
        except OSError as exc:
            self._degrade("network", f"network namespace refused ({exc.strerror})")
        try:
            sandbox_os.unshare(sandbox_os.CLONE_NEWIPC)
        except OSError:
            pass
        try:
            self._pivot_into_bare_root(_interpreter_paths())
        except OSError as exc:
            self._degrade("filesystem", f"private root refused ({exc.strerror or exc}); the "
                                        "program sees the host's files")
            os.chdir(self.job["scratch"])
            try:
                os.chown(".", candidate_uid, candidate_uid)
            except OSError:
                pass
        problem = self._probe_uid(candidate_uid)
        if problem is None:
            self.uid = candidate_uid
            self.layers["uid"] = f"tests run as uid {candidate_uid}"
            self.layers["processes"] = (f"RLIMIT_NPROC={self.limits['max_processes']} "
                                        "for that uid")
        else:
            self._degrade("uid", f"uid drop unusable ({problem}); tests run as root, so "
                                 "RLIMIT_NPROC is not enforced")

    def _join_cgroup(self) -> None:
        memory = self.limits["run_memory_bytes"]
        try:
            self.cgroup = sandbox_os.RunCgroup.create(os.getpid(), memory,
                                                      self.limits["max_processes"] + 4)
            self.layers["memory"] = (f"{memory} bytes for all of the run's processes together "
                                     f"(cgroup {self.cgroup.version})")
        except OSError as exc:
            fallback = self.limits["memory_bytes"] * self.limits["max_processes"]
            self._degrade("memory", f"no run cgroup ({exc.strerror or exc}): memory is bounded "
                                    f"per process only, up to {fallback} bytes for the run")

    def _pivot_into_bare_root(self, needed: list[str]) -> None:
        """Make the scratch directory a tmpfs holding only what Python needs, and pivot into it.

        Read-only binds of the interpreter's directories and the shared-library directories,
        a few device files, a private /tmp and a /proc in which the sandbox uid sees only its
        own processes; nothing else of the host (no /run, /home, /etc or sockets).
        """
        sandbox_os.unshare(sandbox_os.CLONE_NEWNS)
        sandbox_os.mount(None, "/", None, sandbox_os.MS_REC | sandbox_os.MS_PRIVATE)
        root = os.path.realpath(self.job["scratch"])
        sandbox_os.mount("tmpfs", root, "tmpfs", sandbox_os.MS_NOSUID | sandbox_os.MS_NODEV,
                         "size=1m,mode=0755")
        bound: list[str] = []
        for path in _LIBRARY_DIRS:
            if os.path.islink(path):
                os.symlink(os.readlink(path), root + path)
            elif os.path.isdir(path):
                _bind(path, _make_mount_point(root, path, True), read_only=True)
                bound.append(path)
        for path in needed:
            if not any(path == b or path.startswith(b + "/") for b in bound):
                _bind(path, _make_mount_point(root, path, True), read_only=True)
        for path in _LIBRARY_FILES:
            if os.path.isfile(path):
                _bind(path, _make_mount_point(root, path, False), read_only=True)
        for name in _DEV_FILES:
            if os.path.exists(f"/dev/{name}"):
                _bind(f"/dev/{name}", _make_mount_point(root, f"/dev/{name}", False), False)
        os.symlink("/tmp", root + "/dev/shm")
        size = self.limits["scratch_bytes"]
        sandbox_os.mount("tmpfs", _make_mount_point(root, "/tmp", True), "tmpfs",
                         sandbox_os.MS_NOSUID | sandbox_os.MS_NODEV, f"size={size},mode=1777")
        proc_target = _make_mount_point(root, "/proc", True)
        try:
            sandbox_os.mount("proc", proc_target, "proc", sandbox_os.MS_NOSUID
                             | sandbox_os.MS_NODEV, "hidepid=invisible,subset=pid")
            proc = "own processes only"
        except OSError:
            sandbox_os.mount("proc", proc_target, "proc", sandbox_os.MS_NOSUID
                             | sandbox_os.MS_NODEV, "hidepid=2")
            proc = "own processes only (hidepid=2)"
        os.chdir(root)
        os.mkdir(".old-root")
        sandbox_os.pivot_root(".", ".old-root")
        os.chdir("/")
        sandbox_os.umount_detached("/.old-root")
        os.rmdir("/.old-root")
        sandbox_os.mount(None, "/", None, sandbox_os.MS_REMOUNT | sandbox_os.MS_RDONLY
                         | sandbox_os.MS_NOSUID | sandbox_os.MS_NODEV)
        os.chdir("/tmp")
        self.layers["filesystem"] = (
            "isolated (pivot_root into a read-only tmpfs root: the interpreter and shared "
            f"libraries bound read-only, /dev/null etc., a private /tmp, /proc with {proc})")

    def _degrade(self, layer: str, message: str) -> None:
        self.layers[layer] = "NOT isolated: " + message
        self.degraded.append(message)

    def _probe_uid(self, uid: int) -> str | None:
        pid = os.fork()
        if pid == 0:
            code = 4
            try:
                _drop_privileges(uid)
                code = 3
                if os.access(os.path.dirname(os.path.realpath(sys.executable)), os.X_OK) and all(
                        os.access(p, os.R_OK | os.X_OK) for p in _interpreter_paths()):
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
                     keep_fds: tuple[int, ...] = (), cpu_s: float | None = None) -> None:
        """Turn a freshly forked child into a sandboxed process (`keep_fds` become 3, 4, ...)."""
        os.setpgid(0, 0)
        if self.cgroup is not None:
            self.cgroup.join()
        # Move the kept descriptors above everything first, so the dup2s below cannot clobber.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + len(keep_fds)) for fd in keep_fds]
        for fd_target, fd_source in ((0, stdin_fd), (1, stdout_fd), (2, stderr_fd)):
            os.dup2(fd_source, fd_target)
        for offset, fd in enumerate(high):
            os.dup2(fd, 3 + offset)
        os.closerange(3 + len(high), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        if self.uid is not None:
            _drop_privileges(self.uid)
        sandbox_os.prctl(sandbox_os.PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid clears it
        limits = self.limits
        cpu = int(cpu_s if cpu_s is not None else self.time_limit) + 1
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
        for sig in (signal.SIGXFSZ, signal.SIGPIPE, signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
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

    def _kill_leftovers(self, keep_template: bool = True) -> None:
        """Kill every process of the run's uid and every child of the runner (but the server
        template while tests remain); reap them."""
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
        spare = (self.template[0],) if keep_template and self.template is not None else ()
        sandbox_os.kill_and_reap_children(spare=spare)

    def _memory_reason(self, oom_kills_before: int) -> str | None:
        if self.cgroup is not None and self.cgroup.oom_kills() > oom_kills_before:
            return (f"memory limit exceeded ({self.cgroup.limit_bytes} bytes for the run's "
                    "processes together)")
        return None

    def _oom_kills(self) -> int:
        return self.cgroup.oom_kills() if self.cgroup is not None else 0

    # -- stdio ------------------------------------------------------------------------------
    def run_stdio(self) -> None:
        """Run every case; send the host a digest of its output (the host holds the answers)."""
        program = self.job["program"]
        for index, stdin_text in enumerate(self.job["inputs"]):
            self.emitter.emit(event="output", index=index,
                              **self._run_stdio_case(program, stdin_text))

    def _run_stdio_case(self, program: str, stdin_text: str) -> dict:
        stdin_fd = os.memfd_create("stdin")
        stdout_fd = os.memfd_create("stdout")
        stderr_fd = os.memfd_create("stderr")
        try:
            data = stdin_text.encode("utf-8")
            while data:
                data = data[os.write(stdin_fd, data):]
            os.lseek(stdin_fd, 0, os.SEEK_SET)
            oom_before = self._oom_kills()
            pid = os.fork()
            if pid == 0:
                _child_run(lambda: self._enter_child(stdin_fd, stdout_fd, stderr_fd),
                           lambda: _exec_stdio_program(program))
            exited = sandbox_os.await_exit(pid, self.time_limit)
            status = sandbox_os.kill_group_and_reap(pid)
            self._kill_leftovers()
            if not exited:
                return {"ok": False, "reason": f"time limit exceeded ({self.time_limit:g} s wall)"}
            out_limit = self.limits["output_bytes"]
            if os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0:
                reason = (self._memory_reason(oom_before)
                          or _failure_reason(status, stderr_fd, out_limit))
                return {"ok": False, "reason": reason}
            output = os.pread(stdout_fd, out_limit + 1, 0).decode("utf-8", "replace")
            normalised = " ".join(output.split())
            return {"ok": True, "sha256": hashlib.sha256(normalised.encode()).hexdigest(),
                    "preview": sandbox_os.clip(normalised, _PREVIEW_CHARS)}
        finally:
            for fd in (stdin_fd, stdout_fd, stderr_fd):
                os.close(fd)

    # -- function ---------------------------------------------------------------------------
    def run_function(self) -> None:
        """Judge each test in its own process against a program server (see `sandbox_rpc`)."""
        tests = self.job["tests"]
        server: tuple[int, socket.socket] | None = None
        load_failure: str | None = None
        for index, test_source in enumerate(tests):
            if load_failure is None and server is None:
                server, load_failure = self._start_server(len(tests))
            if load_failure is not None:
                passed, reason = False, load_failure
            else:
                passed, reason, server_ok = self._judge(index, test_source, server[1])
                if not server_ok:
                    self._stop_server(server)
                    server = None
            self.emitter.emit(event="verdict", index=index, passed=passed,
                              reason=sandbox_os.clip(reason, sandbox_rpc.MAX_REASON_CHARS))
        if server is not None:
            self._stop_server(server)

    def start_server_template(self) -> None:
        """Fork the process that forks program servers, before the runner reads the tests.

        Program servers are forks of it, so their memory holds the program and the job's
        settings but never a test. It stays root and outside the sandbox uid.
        """
        control, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            try:
                control.close()
                self._template_main(theirs)
            finally:
                os._exit(0)
        theirs.close()
        self.template = (pid, control)

    def _template_main(self, control: socket.socket) -> None:
        sandbox_os.prctl(sandbox_os.PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the servers
        os.dup2(self.devnull, 0)  # the rest of the job (the tests) stays unread in the pipe
        while True:
            message, fds, _, _ = socket.recv_fds(control, 64, 1)
            if not message or not fds:
                return
            n_tests = int(message)
            pid = os.fork()
            if pid == 0:
                control.close()
                _child_run(lambda: self._enter_child(self.devnull, self.devnull, self.devnull,
                                                     keep_fds=(fds[0],),
                                                     cpu_s=(n_tests + 1) * self.time_limit),
                           lambda: sandbox_rpc.serve(3) or 0)
            os.close(fds[0])
            control.sendall(b"%d\n" % pid)

    def _start_server(self, n_tests: int) -> tuple[tuple[int, socket.socket] | None, str | None]:
        """Start a program server and load the program; ((pid, socket), None) or (None, why)."""
        ours, theirs = socket.socketpair()
        template = self.template[1]
        socket.send_fds(template, [str(n_tests).encode()], [theirs.fileno()])
        pid = int(template.recv(64).split(b"\n")[0])
        theirs.close()
        server = (pid, ours)
        fd = ours.fileno()
        try:
            booted = sandbox_rpc.read_frame(fd, 64, time.monotonic() + _SERVER_BOOT_S)
            if booted != {"booted": True}:
                raise sandbox_rpc.WireError("the program server did not start")
            # From here on the process runs the program: its replies are only believed as data.
            deadline = time.monotonic() + self.time_limit + _LOAD_SLACK_S
            sandbox_rpc.write_frame(fd, {"program": self.job["program"]})
            sandbox_rpc.write_frame(fd, {"op": "hello"})
            reply = sandbox_rpc.read_frame(fd, 4096, deadline)
        except TimeoutError:
            self._stop_server(server)
            return None, (f"time limit exceeded ({self.time_limit:g} s wall) while loading "
                          "the program")
        except (sandbox_rpc.WireError, OSError) as exc:
            self._stop_server(server)
            return None, f"program failed to load: {exc}"
        if type(reply) is not dict or reply.get("loaded") is not True:
            self._stop_server(server)
            error = reply.get("error") if type(reply) is dict else None
            return None, str(error) if error else "program failed to load"
        return server, None

    def _stop_server(self, server: tuple[int, socket.socket]) -> None:
        server[1].close()
        try:  # its own process group (needed without a private uid)
            os.killpg(server[0], signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._kill_leftovers()

    def _judge(self, index: int, test_source: str, link: socket.socket) -> tuple[bool, str, bool]:
        """(passed, reason, server still usable) of one test, judged in its own process."""
        verdict_read, verdict_write = os.pipe()
        oom_before = self._oom_kills()
        pid = os.fork()
        if pid == 0:
            _child_run(lambda: self._enter_child(self.devnull, self.devnull, self.devnull,
                                                 keep_fds=(link.fileno(), verdict_write)),
                       lambda: _judge_main(test_source, index))
        os.close(verdict_write)
        try:
            exited = sandbox_os.await_exit(pid, self.time_limit)
            if not exited:
                # The server goes first: a judge it stopped could not be reaped before.
                self._kill_leftovers()
                return False, f"time limit exceeded ({self.time_limit:g} s wall)", False
            status = os.waitpid(pid, 0)[1]
            os.set_blocking(verdict_read, False)
            try:
                raw = os.read(verdict_read, _MAX_VERDICT_BYTES)
            except BlockingIOError:
                raw = b""
        finally:
            os.close(verdict_read)
        try:
            verdict = json.loads(raw)
            passed, reason = verdict["passed"] is True, str(verdict["reason"])
            server_ok = verdict["server_ok"] is True
        except (ValueError, KeyError, TypeError):
            reason = (self._memory_reason(oom_before) or "the test's process died ("
                      + sandbox_os.describe_status(status, self.limits["output_bytes"]) + ")")
            return False, reason, False
        if not passed and not server_ok:
            reason = self._memory_reason(oom_before) or reason
        return passed, reason, server_ok


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


def _judge_main(test_source: str, index: int) -> int:
    """In the judge process: fd 3 is the program server's socket, fd 4 the verdict pipe."""
    # The program server shares this uid: not dumpable, this process cannot be traced by it,
    # nor its memory or descriptors (the verdict pipe) opened through /proc.
    sandbox_os.prctl(sandbox_os.PR_SET_DUMPABLE, 0)
    passed, reason, server_ok = sandbox_rpc.judge(test_source, index, 3)
    message = json.dumps({"passed": passed, "server_ok": server_ok,
                          "reason": sandbox_os.clip(reason, sandbox_rpc.MAX_REASON_CHARS)})
    os.write(4, message.encode("utf-8")[:_MAX_VERDICT_BYTES])
    return 0


def _read_exactly(fd: int, size: int | None) -> bytes:
    """`size` bytes from `fd` (None: up to end of file), never reading past them."""
    chunks, got = [], 0
    while size is None or got < size:
        chunk = os.read(fd, 1 << 20 if size is None else min(1 << 20, size - got))
        if not chunk:
            if size is None:
                break
            raise EOFError(f"job cut short ({got} of {size} bytes)")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _runner_main() -> int:
    """Entry point of the runner process: read the job, isolate, run tests, report."""
    # Private result channel; fd 1 becomes /dev/null so nothing else writes results.
    result_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    emitter = _Emitter(result_fd)
    try:
        # The job comes in two parts; the tests (second part) are read only after the program
        # server template has been forked (exact reads: nothing of them is buffered before).
        size = int(_read_exactly(0, _JOB_HEADER_BYTES))
        job = json.loads(_read_exactly(0, size))
        sandbox_os.prctl(sandbox_os.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != job["host_pid"]:
            return 1  # the host died before we could arrange to die with it
        sandbox_os.prctl(sandbox_os.PR_SET_CHILD_SUBREAPER, 1)
        runner = _Runner(job, emitter)
        runner.isolate()
        if job["mode"] == "function":
            runner.start_server_template()
        job.update(json.loads(_read_exactly(0, None)))
        os.dup2(devnull, 0)
        emitter.emit(event="isolation", layers=runner.layers, degraded=runner.degraded,
                     uid=runner.uid)
        if job["mode"] == "stdio":
            runner.run_stdio()
        else:
            runner.run_function()
        runner._kill_leftovers(keep_template=False)
        emitter.emit(event="done")
        return 0
    except Exception as exc:  # noqa: BLE001 - report any runner failure to the host
        emitter.emit(event="error", message=sandbox_os.clip(
            f"sandbox runner failed: {type(exc).__name__}: {exc}", 500))
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(_runner_main())

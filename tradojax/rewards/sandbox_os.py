"""Linux process, namespace and mount helpers shared by the sandbox's host side and its runner.

Standard library only: the runner (`sandbox_runner`) loads this file by path in an isolated
interpreter where the package is not importable.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import time

# Linux constants (linux/sched.h, linux/mount.h, linux/prctl.h).
CLONE_NEWNS = 0x00020000

CLONE_NEWIPC = 0x08000000

CLONE_NEWNET = 0x40000000

MS_NOSUID = 2

MS_NODEV = 4

MS_BIND = 4096

MS_REC = 16384

MS_PRIVATE = 1 << 18

PR_SET_PDEATHSIG = 1

PR_SET_CHILD_SUBREAPER = 36

PR_SET_NO_NEW_PRIVS = 38


libc_handle = None


def libc():
    global libc_handle
    if libc_handle is None:
        libc_handle = ctypes.CDLL(None, use_errno=True)
    return libc_handle


def check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def prctl(option: int, value: int) -> None:
    check(libc().prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                         ctypes.c_ulong(0)), f"prctl({option})")


def mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    check(libc().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


def unshare(flags: int) -> None:
    check(libc().unshare(ctypes.c_int(flags)), "unshare")


def iter_processes():
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


def live_pids_of_uid(uid: int) -> list[int]:
    return [pid for pid, puid, state in iter_processes()
            if puid == uid and state not in ("Z", "X")]


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


def children_of(parent: int) -> list[int]:
    return [pid for pid, ppid in live_parents().items() if ppid == parent]


def kill_and_reap_children(timeout_s: float = 2.0) -> None:
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
        for child in children_of(me):
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.001)


def count_processes_of_uid(uid: int) -> int:
    return sum(1 for _, puid, state in iter_processes() if puid == uid and state != "Z")


def kill_uid_processes(uid: int, max_rounds: int = 200) -> int:
    """SIGKILL every live process whose real uid is `uid` (repeating until none is left).

    Returns how many kill signals were sent. Needs permission to signal them (root).
    """
    sent = 0
    for _ in range(max_rounds):
        victims = live_pids_of_uid(uid)
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


def await_exit(pid: int, timeout_s: float) -> bool:
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


def kill_group_and_reap(pid: int) -> int:
    """SIGKILL the process group led by child `pid`, then reap `pid`; its wait status."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return os.waitpid(pid, 0)[1]


def describe_status(status: int, output_bytes: int) -> str:
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


def clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when the thread that started it exits (Linux).

    Returns False where unsupported. Used by reward-pool workers so they never outlive the
    trainer.
    """
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        return True
    except (OSError, AttributeError):
        return False

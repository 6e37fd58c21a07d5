"""Linux process, namespace and mount helpers shared by the sandbox's host side and its runner.

Standard library only: the runner (`sandbox_runner`) loads this file by path in an isolated
interpreter where the package is not importable.
"""

from __future__ import annotations

import ctypes
import os
import platform
import select
import signal
import time

# Linux constants (linux/sched.h, linux/mount.h, linux/prctl.h).
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}

CGROUP_NAME_PREFIX = "tradojax-sandbox-"


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


def umount_detached(target: str) -> None:
    check(libc().umount2(target.encode(), ctypes.c_int(MNT_DETACH)), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    number = _SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(0, f"pivot_root: no syscall number known for {platform.machine()}")
    check(libc().syscall(ctypes.c_long(number), new_root.encode(), put_old.encode()),
          "pivot_root")


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


def kill_and_reap_children(timeout_s: float = 2.0, spare: tuple[int, ...] = ()) -> None:
    """SIGKILL and reap every child of this process but `spare` (orphans come here: we are a
    subreaper)."""
    deadline = time.monotonic() + timeout_s
    me = os.getpid()
    while True:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                break
        victims = [child for child in children_of(me) if child not in spare]
        if not victims or time.monotonic() > deadline:
            return
        for child in victims:
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


# -- per-run cgroups ------------------------------------------------------------------------
# One cgroup per sandbox run, named after the runner's pid and created beside nothing else:
# inside the cgroup the host process already belongs to, so outer limits still apply.


def _cgroup_mounts() -> tuple[str | None, dict[str, str]]:
    """(cgroup v2 mount point, {v1 controller: its mount point}) from /proc/self/mounts."""
    unified, v1 = None, {}
    with open("/proc/self/mounts") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) < 4:
                continue
            if fields[2] == "cgroup2" and unified is None:
                unified = fields[1]
            elif fields[2] == "cgroup":
                for option in fields[3].split(","):
                    if option in ("memory", "pids"):
                        v1.setdefault(option, fields[1])
    return unified, v1


def _own_cgroups() -> tuple[str | None, dict[str, str]]:
    """(this process's v2 cgroup path, {v1 controller: its cgroup path}) from /proc/self/cgroup."""
    v2, v1 = None, {}
    with open("/proc/self/cgroup") as handle:
        for line in handle:
            hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
            if hierarchy == "0":
                v2 = path
            for controller in controllers.split(","):
                if controller in ("memory", "pids"):
                    v1[controller] = path
    return v2, v1


def run_cgroup_plan(runner_pid: int) -> tuple[str, dict[str, str]]:
    """("v2" | "v1" | "", {controller: directory}) of the run's cgroup (not created here).

    cgroup v2 is used where this process's cgroup delegates the memory controller to its
    children; otherwise the v1 memory (and pids) hierarchies; "" when neither is present.
    """
    name = f"{CGROUP_NAME_PREFIX}{runner_pid}"
    try:
        unified, v1_mounts = _cgroup_mounts()
        v2_path, v1_paths = _own_cgroups()
    except OSError:
        return "", {}
    if unified and v2_path is not None:
        parent = os.path.join(unified, v2_path.lstrip("/"))
        try:
            with open(os.path.join(parent, "cgroup.subtree_control")) as handle:
                delegated = handle.read().split()
        except OSError:
            delegated = []
        if "memory" in delegated:
            return "v2", {"memory": os.path.join(parent, name)}
    dirs = {controller: os.path.join(v1_mounts[controller], v1_paths[controller].lstrip("/"), name)
            for controller in ("memory", "pids") if controller in v1_mounts
            and controller in v1_paths}
    return ("v1", dirs) if "memory" in dirs else ("", {})


def remove_run_cgroup(runner_pid: int, timeout_s: float = 1.0) -> None:
    """Remove the run's cgroup directories once their processes are gone (retrying briefly)."""
    _, dirs = run_cgroup_plan(runner_pid)
    deadline = time.monotonic() + timeout_s
    for directory in dirs.values():
        while True:
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError:  # EBUSY while the last processes exit
                if time.monotonic() > deadline:
                    break
                time.sleep(0.005)


class RunCgroup:
    """The run's cgroup, created by the root runner before it leaves the host's filesystem.

    File descriptors stay open so the runner can move children in and read the OOM-kill count
    after it has pivoted into the sandbox root (where /sys/fs/cgroup is not mounted).
    """

    def __init__(self, version: str, procs_fds: list[int], oom_fd: int, limit_bytes: int):
        self.version = version
        self.procs_fds = procs_fds
        self.oom_fd = oom_fd
        self.limit_bytes = limit_bytes

    @classmethod
    def create(cls, runner_pid: int, memory_bytes: int, max_pids: int) -> "RunCgroup":
        version, dirs = run_cgroup_plan(runner_pid)
        if not version:
            raise OSError(0, "no cgroup memory controller is mounted")
        settings = {"v2": {"memory": [("memory.max", memory_bytes), ("memory.swap.max", 0),
                                      ("pids.max", max_pids)]},
                    "v1": {"memory": [("memory.limit_in_bytes", memory_bytes),
                                      ("memory.memsw.limit_in_bytes", memory_bytes)],
                           "pids": [("pids.max", max_pids)]}}[version]
        procs_fds = []
        for controller, directory in dirs.items():
            os.mkdir(directory, 0o755)
            for filename, value in settings.get(controller, []):
                try:
                    with open(os.path.join(directory, filename), "w") as handle:
                        handle.write(str(value))
                except OSError:
                    if filename in ("memory.max", "memory.limit_in_bytes"):
                        raise  # the one setting this cgroup exists for
            procs_fds.append(os.open(os.path.join(directory, "cgroup.procs"), os.O_WRONLY))
        events = "memory.events" if version == "v2" else "memory.oom_control"
        oom_fd = os.open(os.path.join(dirs["memory"], events), os.O_RDONLY)
        return cls(version, procs_fds, oom_fd, memory_bytes)

    def join(self) -> None:
        """Move the calling process into the run's cgroup (needs root; call before setuid)."""
        pid = str(os.getpid()).encode()
        for fd in self.procs_fds:
            os.write(fd, pid)

    def oom_kills(self) -> int:
        """How many processes the kernel killed for exceeding the run's memory limit."""
        try:
            text = os.pread(self.oom_fd, 4096, 0).decode("ascii", "replace")
        except OSError:
            return 0
        for line in text.splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def fds(self) -> list[int]:
        return [*self.procs_fds, self.oom_fd]

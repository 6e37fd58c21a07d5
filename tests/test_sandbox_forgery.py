"""The code sandbox against programs that try to score without being right, or to get out.

Every program goes through a real `RewardPool`, the path the RL loop uses. Each class of attack
from issue 16 has a control that passes, so that a test cannot pass by the attack merely failing
to run: forged verdicts, expected outputs read from the program's own memory, host sockets and
files, the run's total memory, and clipped messages.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path

import pytest

from tradojax.rewards import RewardPool, SandboxLimits
from tradojax.rewards.sandbox import BoundedLineReader, list_sandbox_processes, probe_isolation
from proc_tree import descendants

UID_BASE = 0x40000000 + (os.getpid() % 128) * (1 << 22)
RUN_MEMORY = 256 << 20
LIMITS = SandboxLimits(memory_bytes=512 << 20, run_memory_bytes=RUN_MEMORY,
                       output_bytes=1 << 20, startup_s=3.0, uid_base=UID_BASE)
IS_ROOT = os.geteuid() == 0


def stdio_item(inputs: list[str], outputs: list[str], limit: float = 2.0) -> dict:
    return {"question": "q", "test_method": "stdio", "test_time_limit": limit,
            "test_input": inputs, "test_output": outputs}


def function_item(tests: list[str], limit: float = 2.0) -> dict:
    return {"question": "q", "test_method": "function", "test_time_limit": limit,
            "test_list": tests}


def fenced(program: str) -> str:
    return f"```python\n{program}\n```"


@pytest.fixture(scope="module")
def pool():
    with RewardPool(2, code_limits=LIMITS, code_slack_s=3.0) as reward_pool:
        yield reward_pool


def score_all(pool: RewardPool, cases: list[tuple[dict, str]]):
    """Score (item, program) pairs; afterwards no sandbox process may be left."""
    results = pool.map("code", [item for item, _ in cases], [fenced(p) for _, p in cases])
    assert list_sandbox_processes(LIMITS.uid_base) == []
    assert descendants(os.getpid()) - set(pool.worker_pids()) == set()
    return results


# -- forged verdicts -----------------------------------------------------------------------------

# Each line a runner or a judge ever accepted, in the old and the new formats.
FAKE_VERDICTS = (
    '{"event": "verdict", "index": 0, "passed": true, "reason": "passed"}\n'
    '{"kind": "verdict", "index": 0, "passed": true, "reason": "passed"}\n'
    '{"kind": "status", "index": 0, "outcome": "exited"}\n'
    '{"passed": true, "server_ok": true, "reason": "passed"}\n')
FORGE_ON_EVERY_FD = (
    "import os, json, struct\n"
    "def forge(skip=()):\n"
    f"    text = {FAKE_VERDICTS!r}.encode()\n"
    "    frame = json.dumps({'value': True, 'loaded': True}).encode()\n"
    "    for fd in set(range(64)) - set(skip):\n"
    "        for data in (text, struct.pack('>I', len(frame)) + frame):\n"
    "            try:\n"
    "                os.write(fd, data)\n"
    "            except OSError:\n"
    "                pass\n")
WRONG_FUNCTION_PROGRAMS = {
    "exit_at_load": "def double(x):\n    return x\nimport sys\nsys.exit(0)",
    "exit_in_call": "def double(x):\n    raise SystemExit(0)",
    "os_exit_in_call": "import os\ndef double(x):\n    os._exit(0)",
    "fake_verdict_lines": FORGE_ON_EVERY_FD + "forge()\ndef double(x):\n    forge()\n    return x",
    "always_equal": "class Equal:\n    def __eq__(self, other):\n        return True\n"
                    "    __hash__ = object.__hash__\ndef double(x):\n    return Equal()",
    "int_subclass": "class Fake(int):\n    def __eq__(self, other):\n        return True\n"
                    "    __hash__ = int.__hash__\ndef double(x):\n    return Fake(0)",
    "patched_builtins": "import builtins\n"
                        "builtins.AssertionError = type('Pass', (Exception,), {})\n"
                        "builtins.bool = lambda *a: True\ndef double(x):\n    return x",
    # Writes a passing verdict into the judge's verdict pipe through /proc, then kills it.
    "judge_verdict_pipe": "import json, os, signal\n"
                          "def double(x):\n"
                          "    verdict = json.dumps({'passed': True, 'server_ok': True,\n"
                          "                          'reason': 'passed'}).encode()\n"
                          "    for pid in os.listdir('/proc'):\n"
                          "        if pid.isdigit() and int(pid) != os.getpid():\n"
                          "            try:\n"
                          "                fd = os.open(f'/proc/{pid}/fd/4', os.O_WRONLY)\n"
                          "                os.write(fd, verdict)\n"
                          "                os.kill(int(pid), signal.SIGKILL)\n"
                          "            except OSError:\n"
                          "                pass\n"
                          "    return x",
    # Traces any process it can see (its judge shares its uid); one that could would be able to
    # rewrite the judge's verdict, so it claims the right answer if it ever attached.
    "trace_the_judge": "import ctypes, os\n"
                       "libc = ctypes.CDLL(None, use_errno=True)\n"
                       "def double(x):\n"
                       "    for pid in os.listdir('/proc'):\n"
                       "        if pid.isdigit() and int(pid) != os.getpid():\n"
                       "            if libc.ptrace(16, int(pid), None, None) == 0:  # ATTACH\n"
                       "                libc.ptrace(17, int(pid), None, None)  # DETACH\n"
                       "                return 2 * x\n"
                       "    return x",
    # Keeps writing on every descriptor but the server's socket (where it would only break the
    # protocol and fail at once), so that only the clock can stop it.
    "forged_readiness_spin": FORGE_ON_EVERY_FD + "def double(x):\n    while True:\n"
                             "        forge(skip=(3,))",
}


def test_forged_verdicts_score_nothing(pool: RewardPool) -> None:
    tests = ["assert double(2) == 4", "assert double(-3) == -6", "assert double(0) == 0"]
    names = sorted(WRONG_FUNCTION_PROGRAMS)
    cases = [(function_item(tests, limit=1.0), WRONG_FUNCTION_PROGRAMS[n]) for n in names]
    cases.append((function_item(tests, limit=1.0), "def double(x):\n    return 2 * x"))
    *wrong, right = score_all(pool, cases)
    assert (right.score, right.correct) == (3.0, True), right.reason
    for name, result in zip(names, wrong):
        # double(0) == 0 is the one test a program returning its argument passes honestly.
        honest = 1.0 if name in ("exit_at_load", "patched_builtins", "judge_verdict_pipe",
                                 "trace_the_judge") else 0.0
        assert (result.score, result.correct) == (honest, False), f"{name}: {result.reason}"
    reasons = {n: [t["reason"] for t in r.details["tests"]] for n, r in zip(names, wrong)}
    assert reasons["exit_in_call"][0] == "the program raised SystemExit during the test"
    assert "closed the connection" in reasons["os_exit_in_call"][0]
    assert reasons["always_equal"][0] == "assertion failed"
    assert "program failed to load" in reasons["fake_verdict_lines"][0]
    # Each test of the spinning program ends at its own limit: a forged message restarts no
    # clock, so the run never reaches the host's overall wall-clock budget.
    spin = wrong[names.index("forged_readiness_spin")]
    assert all("time limit exceeded (1 s wall)" in r for r in reasons["forged_readiness_spin"])
    assert "runner_error" not in spin.details


def test_stdio_verdict_lines_on_every_fd_do_not_pass(pool: RewardPool) -> None:
    forge = FORGE_ON_EVERY_FD + "forge()\nprint('wrong')"
    (result,) = score_all(pool, [(stdio_item(["1\n"], ["right"]), forge)])
    assert (result.score, result.correct) == (0.0, False)
    assert "wrong answer" in result.reason, result.reason


# -- expected outputs are not in the program's memory -----------------------------------------

MEMORY_SCAN = (
    "import ctypes, re\n"
    "def scan(pattern):\n"
    "    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: let it read its own memory\n"
    "    found = []\n"
    "    with open('/proc/self/maps') as maps, open('/proc/self/mem', 'rb', 0) as mem:\n"
    "        for line in maps:\n"
    "            span, perms = line.split()[:2]\n"
    "            if not perms.startswith('rw'):\n"
    "                continue\n"
    "            lo, hi = (int(x, 16) for x in span.split('-'))\n"
    "            try:\n"
    "                mem.seek(lo)\n"
    "                found += re.findall(pattern, mem.read(hi - lo))\n"
    "            except (OSError, OverflowError, ValueError):\n"
    "                pass\n"
    "    return found\n"
    "def best_guess():\n"
    "    answers = scan(rb'ANSWER-[0-9a-f]{32}')\n"
    "    if answers:\n"
    "        return answers[0].decode()\n"
    "    questions = scan(rb'QUESTION-[0-9a-f]{32}')\n"
    "    return questions[0].decode() if questions else 'nothing found'\n")


def test_programs_cannot_read_expected_outputs(pool: RewardPool) -> None:
    def token(kind: str) -> str:
        return f"{kind}-{secrets.token_hex(16)}"

    question, answer, control = token("QUESTION"), token("ANSWER"), token("QUESTION")
    stdio_program = MEMORY_SCAN + "input()\nprint(best_guess())"
    function_program = MEMORY_SCAN + "def solve(question):\n    return best_guess()"
    cases = [
        (stdio_item([question + "\n"], [answer]), stdio_program),
        # control: the scan does find what is in its memory (here the input)
        (stdio_item([control + "\n"], [control]), stdio_program),
        (function_item([f"assert solve({question!r}) == {answer!r}"]), function_program),
        (function_item([f"assert solve({control!r}) == {control!r}"]), function_program),
    ]
    stdio_attack, stdio_control, function_attack, function_control = score_all(pool, cases)
    assert stdio_control.score == 1.0, stdio_control.reason
    assert function_control.score == 1.0, function_control.reason
    assert stdio_attack.score == 0.0 and f"got {question!r}" in stdio_attack.reason
    assert function_attack.score == 0.0, function_attack.reason


# -- nothing of the host is reachable ------------------------------------------------------------


@pytest.mark.skipif(not IS_ROOT, reason="the private root needs root (a degraded run says so)")
def test_host_sockets_and_files_are_unreachable(pool: RewardPool, tmp_path: Path) -> None:
    # A path socket where host daemons keep theirs, open to everyone, and an abstract one.
    socket_dir = Path("/run") / f"tradojax-test-{os.getpid()}-{secrets.token_hex(4)}"
    socket_dir.mkdir(mode=0o777)
    socket_dir.chmod(0o777)
    path = str(socket_dir / "host.sock")
    abstract = f"\0tradojax-test-{secrets.token_hex(8)}"
    listeners = []
    try:
        for address in (path, abstract):
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(address)
            listener.listen()
            listener.setblocking(False)
            listeners.append(listener)
        os.chmod(path, 0o777)
        program = (
            "import socket\n"
            f"for address in ({path!r}, {abstract!r}):\n"
            "    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            "    try:\n"
            "        s.connect(address)\n"
            "        s.sendall(b'escaped')\n"
            "        print('connected')\n"
            "    except OSError as exc:\n"
            "        print(type(exc).__name__)\n")
        host_files = ["/etc/passwd", "/etc/hostname", "/run", "/home", "/var", "/sys",
                      str(Path(__file__).resolve()), str(tmp_path)]
        probe = ("import os\n"
                 f"print(sorted(p for p in {host_files!r} if os.path.exists(p)))\n"
                 "print(len([p for p in os.listdir('/proc') if p.isdigit()]))")
        sockets, files = score_all(pool, [
            (stdio_item(["\n"], ["connected connected"]), program),
            (stdio_item(["\n"], ["[] 1"]), probe),
        ])
        assert sockets.score == 0.0
        assert "got 'FileNotFoundError ConnectionRefusedError'" in sockets.reason, sockets.reason
        for listener in listeners:
            with pytest.raises(BlockingIOError):
                listener.accept()  # nobody connected
        # No host path exists inside, and /proc shows the program its own process only.
        assert files.score == 1.0, files.reason
    finally:
        for listener in listeners:
            listener.close()
        os.unlink(path)
        socket_dir.rmdir()


# -- the run's memory, all processes together --------------------------------------------------


def children_allocating(n_children: int, mib: int) -> str:
    return ("import os\n"
            "pids = []\n"
            f"for _ in range({n_children}):\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            f"        block = b'x' * ({mib} << 20)\n"
            "        import time\n"
            "        time.sleep(0.3)\n"
            "        os._exit(0)\n"
            "    pids.append(pid)\n"
            "codes = [os.waitpid(pid, 0)[1] for pid in pids]\n"
            "print('ok' if all(c == 0 for c in codes) else 'killed')")


def test_memory_is_bounded_across_the_runs_processes(pool: RewardPool) -> None:
    report = probe_isolation(LIMITS)
    if not report.isolation.get("memory", "").startswith(str(RUN_MEMORY)):
        # No usable cgroup: the report must say that only the per-process bound holds.
        assert any("memory is bounded per process only" in d for d in report.degraded), report
        return
    # 3 x 120 MiB: each process is within its own 512 MiB, together over the run's 256 MiB.
    over, under = score_all(pool, [(stdio_item(["\n"], ["ok"], limit=5.0),
                                    children_allocating(3, 120)),
                                   (stdio_item(["\n"], ["ok"], limit=5.0),
                                    children_allocating(1, 120))])
    assert under.score == 1.0, under.reason
    assert over.score == 0.0
    assert "got 'killed'" in over.reason or "memory limit exceeded" in over.reason, over.reason


# -- clipped messages ------------------------------------------------------------------------------


def test_program_text_reaches_the_caller_clipped(pool: RewardPool) -> None:
    huge = 8 << 20
    oversized_frame = ("import os, struct\n"
                       "def f(x):\n"
                       "    os.write(3, struct.pack('>I', 100 << 20) + b'{' * 1000)\n"
                       "    import time\n"
                       "    time.sleep(30)")
    results = score_all(pool, [
        (function_item(["assert f(1) == 2"]), f"def f(x):\n    raise ValueError('x' * {huge})"),
        (function_item(["assert f(1) == 2"]),
         f"class Boom(Exception):\n    pass\ndef f(x):\n    raise Boom('y' * {huge})"),
        (stdio_item(["\n"], ["5"]),
         "import sys\nsys.stderr.write('z' * (900 << 10))\nsys.exit(1)"),
        (stdio_item(["\n"], ["5"]), "print('w' * (900 << 10))"),
        (function_item(["assert f(1) == 2"], limit=5.0), oversized_frame),
    ])
    for result in results:
        assert result.score == 0.0
        assert len(result.reason) < 1000, len(result.reason)
        assert all(len(t["reason"]) < 400 for t in result.details["tests"])
    assert "runtime error: ValueError: xxx" in results[0].reason
    assert "Boom: yyy" in results[1].reason
    assert "exceeds the" in results[4].reason  # refused at its header, not read or waited for


def test_line_reader_is_linear_and_bounded() -> None:
    reader = BoundedLineReader(64 << 10)
    start = time.monotonic()
    lines = []
    for _ in range(4096):  # 4 MiB in 1 KiB chunks, one line per 100 bytes
        lines += reader.feed((b"y" * 99 + b"\n") * 10 + b"z" * 24)
    assert time.monotonic() - start < 2.0
    assert len(lines) == 40960 and not reader.overflowed
    reader.feed(b"q" * (8 << 20))  # a forged 8 MiB message without a newline
    assert reader.overflowed and len(reader.buffer) == 0

"""Code reward: extraction, test semantics, and sandbox containment of adversarial programs.

Adversarial programs run through a real `RewardPool`; after each one the pool must still score
a good program, and no sandbox process (nor any process other than the pool's workers) may be
left under this test process.
"""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
import time
from pathlib import Path

import pytest

from tradojax.data.readers import code_task_from_dict
from tradojax.rewards import RewardPool, SandboxLimits, extract_program, parse_code_task, score_code
from tradojax.rewards import sandbox
from tradojax.rewards.sandbox import list_sandbox_processes, probe_isolation
from proc_tree import descendants

# A uid range of our own, so that leftover checks ignore concurrent test processes (xdist).
UID_BASE = 0x40000000 + (os.getpid() % 128) * (1 << 22)
LIMITS = SandboxLimits(memory_bytes=512 << 20, output_bytes=1 << 20, startup_s=3.0,
                       uid_base=UID_BASE)
SECRET_NAME = "TRADOJAX_TEST_FAKE_SECRET"
SECRET_VALUE = "fake-secret-" + secrets.token_hex(8)
IS_ROOT = os.geteuid() == 0


def stdio_item(inputs: list[str], outputs: list[str], limit: float = 1.0) -> dict:
    return {"question": "q", "test_method": "stdio", "test_time_limit": limit,
            "test_input": inputs, "test_output": outputs}


def function_item(tests: list[str], limit: float = 1.0, prefix: str | None = None) -> dict:
    item = {"question": "q", "test_method": "function", "test_time_limit": limit,
            "test_list": tests}
    if prefix is not None:
        item["prefix"] = prefix
    return item


def fenced(program: str) -> str:
    return f"Here is my solution.\n```python\n{program}\n```\nDone."


GOOD_STDIO = (stdio_item(["2 3\n", "10 -4\n"], ["5", "6"]),
              fenced("a, b = map(int, input().split())\nprint(a + b)"))


def assert_nothing_left(pool: RewardPool) -> None:
    assert list_sandbox_processes(LIMITS.uid_base) == []
    extra = descendants(os.getpid()) - set(pool.worker_pids())
    assert extra == set(), f"leftover processes: {extra}"


@pytest.fixture(scope="module")
def pool():
    # The secret is in the environment of this process and of the pool workers.
    previous = os.environ.get(SECRET_NAME)
    os.environ[SECRET_NAME] = SECRET_VALUE
    try:
        with RewardPool(2, code_limits=LIMITS, code_slack_s=3.0) as reward_pool:
            # Both workers started (math-verify imported), so timings below are the sandbox's.
            reward_pool.map("code", [GOOD_STDIO[0]] * 2, [GOOD_STDIO[1]] * 2)
            yield reward_pool
    finally:
        if previous is None:
            os.environ.pop(SECRET_NAME, None)
        else:
            os.environ[SECRET_NAME] = previous


def run_adversarial(pool: RewardPool, item: dict, response: str):
    """Score an adversarial item followed by a good one; check the pool survived."""
    start = time.monotonic()
    bad, good = pool.map("code", [item, GOOD_STDIO[0]], [response, GOOD_STDIO[1]])
    assert (good.score, good.correct) == (2.0, True), good.reason
    assert_nothing_left(pool)
    return bad, time.monotonic() - start


# -- extraction and task parsing -------------------------------------------------------------


def test_extract_last_python_block_wins() -> None:
    text = "```python\nprint(1)\n```\nthen\n```python\nprint(2)\n```\n```text\nnot code\n```"
    assert extract_program(text) == "print(2)"


@pytest.mark.parametrize(("response", "expected"), [
    ("```py\nx = 1\n```", "x = 1"),
    ("```Python3\nx = 2\n```", "x = 2"),
    ("```python\n    if True:\n        y = 3\n```", "if True:\n    y = 3"),
    ("text\n```python\nz = 4\n", "z = 4"),  # unterminated final block
    ("no code here", None),
    ("```\nplain fence\n```", None),
    ("```python\n\n```", None),
])
def test_extract_program_variants(response: str, expected: str | None) -> None:
    assert extract_program(response) == expected


def test_prefix_is_prepended_for_function_tasks() -> None:
    prefix = "```python\ndef add(a, b):\n"
    assert extract_program("    return a + b\n```", prefix) == "def add(a, b):\n    return a + b"


def test_parse_code_task_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="item 3: field 'test_method'"):
        parse_code_task({"test_method": "http"}, "item 3")
    with pytest.raises(ValueError, match="missing field 'test_list'"):
        parse_code_task({"test_method": "function"})
    with pytest.raises(ValueError, match="'test_input' \\(2\\) and 'test_output' \\(1\\)"):
        parse_code_task(stdio_item(["1", "2"], ["1"]))
    with pytest.raises(ValueError, match="'test_time_limit' must be a positive number"):
        parse_code_task(stdio_item(["1"], ["1"], limit=0))
    with pytest.raises(ValueError, match="test_list\\[1\\] must be a string"):
        parse_code_task(function_item(["assert True", None]))  # type: ignore[list-item]
    with pytest.raises(ValueError, match="'test_list' is empty"):
        parse_code_task(function_item([]))
    task = parse_code_task({"test_method": "stdio", "test_input": ["1"], "test_output": [2]})
    assert task.test_time_limit == 1.0 and task.test_output == ("2",)


def test_rewards_take_the_data_layers_code_task() -> None:
    """One task type: a reader's CodeTask is scored as is, and its JSON form parses back to it."""
    task = code_task_from_dict({"question": "Add.", "test_method": "function", "test_time_limit": 2,
                                "test_list": ["assert add(1, 2) == 3"], "prefix": "def add(a, b):\n"})
    assert parse_code_task(task) is task
    assert parse_code_task(task.to_dict()) == task
    stdio = code_task_from_dict({"question": "Echo.", "test_method": "stdio", "test_input": ["7\n"],
                                 "test_output": ["7"]})
    assert parse_code_task(stdio.to_dict()) == stdio


# -- semantics (direct calls, no pool) ---------------------------------------------------------


def test_function_tests_pass_and_fail_with_counts() -> None:
    prefix = "```python\ndef is_even(n):\n"
    item = function_item(["assert is_even(2)", "assert not is_even(3)", "assert is_even(0)"],
                         prefix=prefix)
    good = score_code(item, "    return n % 2 == 0\n```")
    assert (good.score, good.correct) == (3.0, True), good.reason
    wrong = score_code(item, "    return n == 2\n```")
    assert (wrong.score, wrong.correct) == (2.0, False)
    assert wrong.reason.startswith("passed 2/3 tests; test 2: assertion failed")
    assert [t["passed"] for t in wrong.details["tests"]] == [True, True, False]


def test_stdio_tests_pass_and_fail_with_counts() -> None:
    item = stdio_item(["3\n1 2 3\n", "2\n5 5\n", "1\n-7\n"], ["6", "10", "-7"])
    good = score_code(item, fenced("n = int(input())\nprint(sum(map(int, input().split())))"))
    assert (good.score, good.correct) == (3.0, True), good.reason
    wrong = score_code(item, fenced("n = int(input())\nprint(n)"))
    assert (wrong.score, wrong.correct) == (0.0, False)
    assert "wrong answer: got '3', expected '6'" in wrong.reason
    partial = score_code(item, fenced("n = int(input())\nprint(10 if n == 2 else 0)"))
    assert (partial.score, partial.correct) == (1.0, False)


def test_stdio_semantics() -> None:
    item = stdio_item(["4 5\n", "1 1\n"], ["9\n", "  2 "])
    cases = {
        # input() prompts are not echoed (the original replaced input by a line iterator)
        "prompt": "a, b = map(int, input('numbers please: ').split())\nprint(a + b)",
        "stdin_read": "import sys\nprint(sum(map(int, sys.stdin.read().split())))",
        "stdin_buffer": "import sys\nprint(sum(map(int, sys.stdin.buffer.readline().split())))",
        "exit_keeps_output": "import sys\nprint(sum(map(int, input().split())))\nsys.exit(3)",
        "main_guard": "def main():\n    print(sum(map(int, input().split())))\n"
                      "if __name__ == '__main__':\n    main()",
        "whitespace": "a, b = map(int, input().split())\nprint('', a + b, '', sep='\\n')",
    }
    for name, program in cases.items():
        result = score_code(item, fenced(program))
        assert result.score == 2.0, f"{name}: {result.reason}"


def test_function_semantics() -> None:
    program = ("def f(x):\n    return 2 * x\n"
               "if __name__ == '__main__':\n    print(f(int(input())))\n")  # must not run
    item = function_item(["assert f(2) == 4", "import sys; sys.exit(0)",
                          "assert f(1) == 3", "assert g(1) == 2", "assert 1/0"])
    result = score_code(item, fenced(program))
    assert result.score == 2.0
    reasons = [t["reason"] for t in result.details["tests"]]
    assert reasons[1].startswith("passed (SystemExit")
    assert reasons[2] == "assertion failed"
    assert reasons[3].startswith("runtime error: NameError")
    assert reasons[4].startswith("runtime error: ZeroDivisionError")


def test_function_tests_use_program_objects_across_the_judge() -> None:
    """Right answers of many shapes pass when each assert runs in a judge outside the program:
    classes and methods, generators, exceptions the test catches, in-place changes to arguments,
    nested plain values, program constants and HumanEval's check(candidate)."""
    program = (
        "class Solution:\n"
        "    def twoSum(self, nums, target):\n"
        "        seen = {}\n"
        "        for i, x in enumerate(nums):\n"
        "            if target - x in seen:\n"
        "                return [seen[target - x], i]\n"
        "            seen[x] = i\n"
        "class Point:\n"
        "    def __init__(self, x, y):\n"
        "        self.x, self.y = x, y\n"
        "    def __eq__(self, other):\n"
        "        return (self.x, self.y) == (other.x, other.y)\n"
        "def evens(n):\n"
        "    yield from range(0, n, 2)\n"
        "def positive(x):\n"
        "    if x < 0:\n"
        "        raise ValueError('negative')\n"
        "    return x\n"
        "def sort_in_place(xs):\n"
        "    xs.sort()\n"
        "def pair(a, b):\n"
        "    return (a, {b: [a, b]}, {a, b}, b'x', 1 + 2j, None, float('inf'))\n"
        "LIMIT = 10\n")
    tests = [
        "assert Solution().twoSum([2, 7, 11], 9) == [0, 1]",
        "assert Point(1, 2) == Point(1, 2) and not Point(1, 2) == Point(2, 1)",
        "assert list(evens(5)) == [0, 2, 4] and len(list(evens(3))) == 2",
        "try:\n    positive(-1)\n    assert False\nexcept ValueError as e:\n"
        "    assert str(e) == 'negative'",
        "xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]",
        "assert pair(1, 'b') == (1, {'b': [1, 'b']}, {1, 'b'}, b'x', 1 + 2j, None, float('inf'))",
        "assert LIMIT == 10 and type(LIMIT) is int",
        "def check(candidate):\n    assert candidate(3) == 3\ncheck(positive)",
        "assert sorted(map(positive, [3, 1])) == [1, 3]",
        "assert all(positive(k) == k for k in range(20))",
    ]
    result = score_code(function_item(tests, limit=3.0), fenced(program))
    assert (result.score, result.correct) == (len(tests), True), result.details["tests"]
    wrong = score_code(function_item(tests, limit=3.0),
                       fenced(program.replace("return [seen[target - x], i]", "return [i]")))
    assert wrong.score == len(tests) - 1
    assert wrong.details["tests"][0]["reason"] == "assertion failed"


def test_errors_and_missing_code() -> None:
    item = stdio_item(["1\n"], ["1"])
    none = score_code(item, "I think the answer is print(1)")
    assert none.score == 0.0 and "no ```python code block" in none.reason
    syntax = score_code(item, fenced("print(1"))
    assert syntax.score == 0.0 and "SyntaxError" in syntax.reason
    crash = score_code(item, fenced("raise ValueError('bad input')"))
    assert crash.score == 0.0 and "runtime error: ValueError: bad input" in crash.reason
    load_fail = score_code(function_item(["assert True", "assert 1"]),
                           fenced("import nonexistent_mod"))
    assert load_fail.score == 0.0
    assert all("program failed to load: ModuleNotFoundError" in t["reason"]
               for t in load_fail.details["tests"])


def test_each_function_test_gets_its_own_time_limit() -> None:
    # Spec 10 item 19: the original gave the whole list limit + 2 s (here 3 s for 3.6 s of work).
    program = "import time\ndef slow(x):\n    time.sleep(0.6)\n    return x"
    item = function_item([f"assert slow({k}) == {k}" for k in range(6)], limit=1.0)
    result = score_code(item, fenced(program))
    assert (result.score, result.correct) == (6.0, True), result.reason


def test_isolation_layers_reported() -> None:
    report = probe_isolation(LIMITS)
    assert report.all_passed, report
    if IS_ROOT:
        assert report.degraded == []
        assert report.isolation["network"].startswith("isolated")
        assert report.isolation["filesystem"].startswith("isolated")
        assert report.isolation["uid"].startswith("tests run as uid")
    else:
        assert any("not running as root" in d for d in report.degraded)


def test_degraded_sandbox_is_reported_in_reason() -> None:
    limits = SandboxLimits(isolate=False, memory_bytes=512 << 20, startup_s=3.0)
    result = score_code(stdio_item(["1\n"], ["1"]), fenced("print(input())"), limits=limits)
    assert result.score == 1.0
    assert "[sandbox degraded: isolation disabled by configuration" in result.reason
    assert result.details["sandbox"]["all"].startswith("NOT isolated")
    looping = score_code(stdio_item(["1\n"], ["1"], limit=0.5), fenced("while True: pass"),
                         limits=limits)
    assert looping.score == 0.0 and "time limit exceeded" in looping.reason


@pytest.mark.parametrize("isolate", [True, False])
def test_scratch_directories_are_removed(monkeypatch: pytest.MonkeyPatch, isolate: bool) -> None:
    created: list[str] = []
    real_mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(*args, **kwargs):
        created.append(real_mkdtemp(*args, **kwargs))
        return created[-1]

    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", recording_mkdtemp)
    limits = SandboxLimits(isolate=isolate, memory_bytes=512 << 20, uid_base=UID_BASE)
    # Without a mount namespace the program writes into the host scratch directory itself,
    # including a subdirectory it makes read-only.
    result = score_code(stdio_item(["1\n"], ["1"]),
                        fenced("import os\nos.makedirs('a/b', exist_ok=True)\n"
                               "open('a/b/f', 'w').write('x')\nos.chmod('a', 0o500)\nprint(1)"),
                        limits=limits)
    assert result.score == 1.0, result.reason
    assert len(created) == 1 and not os.path.exists(created[0])


# -- adversarial programs through the pool -----------------------------------------------------

# name: (program, expected reason fragment, test_time_limit)
ADVERSARIAL_STDIO = {
    "infinite_loop": ("while True:\n    pass", "time limit exceeded", 0.5),
    "sleep_forever": ("import time\ntime.sleep(3600)", "time limit exceeded", 0.5),
    "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n"
                  "    except OSError:\n        pass", "time limit exceeded", 0.5),
    "memory_bomb": ("x = bytearray(1 << 40)\nprint(len(x))", "memory limit exceeded", 0.5),
    "memory_growth": ("chunks = []\nwhile True:\n    chunks.append(bytearray(200_000_000))",
                      "memory limit exceeded", 3.0),
    "huge_output": ("while True:\n    print('x' * 65536)", "output limit exceeded", 0.5),
    "kill_parent": ("import os\nos.kill(os.getppid(), 9)\nprint('5')",
                    "PermissionError" if IS_ROOT else "", 0.5),
    "segfault": ("import ctypes\nctypes.string_at(0)", "killed by signal SIGSEGV", 0.5),
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL_STDIO))
def test_adversarial_stdio_is_contained(pool: RewardPool, name: str) -> None:
    program, reason, limit = ADVERSARIAL_STDIO[name]
    bad, elapsed = run_adversarial(pool, stdio_item(["\n"], ["5"], limit=limit), fenced(program))
    assert (bad.score, bad.correct) == (0.0, False)
    assert reason in bad.reason, bad.reason
    assert elapsed < limit + 6.0


def test_adversarial_function_tests_are_contained(pool: RewardPool) -> None:
    program = "import os, time\ndef f(x):\n    return x"
    tests = ["assert f(1) == 1", "while True: pass", "x = bytearray(1 << 40)",
             "import os; os.kill(os.getppid(), 9)", "assert f(2) == 2"]
    bad, _ = run_adversarial(pool, function_item(tests, limit=0.5), fenced(program))
    verdicts = bad.details["tests"]
    assert [v["passed"] for v in verdicts] == [True, False, False, False, True]
    assert "time limit exceeded" in verdicts[1]["reason"]
    assert "memory limit exceeded" in verdicts[2]["reason"]
    # A test runs in its own judge process, whose parent (the root runner) it cannot signal.
    assert "PermissionError" in verdicts[3]["reason"] or not IS_ROOT
    hang_on_load, _ = run_adversarial(pool, function_item(["assert True"], limit=0.5),
                                      fenced("while True:\n    pass"))
    assert hang_on_load.score == 0.0
    assert "time limit exceeded" in hang_on_load.details["tests"][0]["reason"]


def test_writes_outside_scratch_are_contained(pool: RewardPool, tmp_path: Path) -> None:
    if not IS_ROOT:  # no mount namespace or uid drop: the result must say so
        result = score_code(stdio_item(["\n"], ["5"]), fenced("print('5')"), limits=LIMITS)
        assert "[sandbox degraded: not running as root" in result.reason
        return
    open_dir = tmp_path / "world_writable"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    targets = [open_dir / "escape.txt", Path(__file__).parent / "sandbox_escape_probe.txt",
               Path("/var/tmp") / f"tradojax_escape_{os.getpid()}.txt"]
    for target in targets:
        program = f"open({str(target)!r}, 'w').write('escaped')\nprint('5')"
        bad, _ = run_adversarial(pool, stdio_item(["\n"], ["5"]), fenced(program))
        assert bad.score == 0.0 or target.parent == Path("/var/tmp"), bad.reason
        assert not target.exists(), f"the program wrote {target}"
    # Files in the private /tmp work (the working directory) and vanish with the run.
    marker = f"/tmp/tradojax_private_{os.getpid()}.txt"
    program = f"open({marker!r}, 'w').write('5')\nprint(open({marker!r}).read())"
    ok, _ = run_adversarial(pool, stdio_item(["\n"], ["5"]), fenced(program))
    assert ok.score == 1.0, ok.reason
    assert not os.path.exists(marker)


def test_network_is_unreachable(pool: RewardPool) -> None:
    if not IS_ROOT:  # no network namespace: the result must say so
        result = score_code(stdio_item(["\n"], ["5"]), fenced("print('5')"), limits=LIMITS)
        assert "[sandbox degraded: not running as root" in result.reason
        return
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        for host in ("127.0.0.1", "8.8.8.8"):
            program = (f"import socket\ns = socket.create_connection(({host!r}, {port}), "
                       f"timeout=0.3)\nprint('5')")
            bad, _ = run_adversarial(pool, stdio_item(["\n"], ["5"]), fenced(program))
            assert bad.score == 0.0
            assert "Network is unreachable" in bad.reason, bad.reason
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    finally:
        listener.close()


def test_environment_secrets_are_not_visible(pool: RewardPool) -> None:
    program = (
        "import os\n"
        f"found = os.environ.get({SECRET_NAME!r}, '')\n"
        f"needle = {SECRET_VALUE[::-1]!r}[::-1].encode()\n"
        "for pid in os.listdir('/proc'):\n"
        "    if pid.isdigit():\n"
        "        try:\n"
        "            if needle in open(f'/proc/{pid}/environ', 'rb').read():\n"
        "                found = 'leaked'\n"
        "        except OSError:\n"
        "            pass\n"
        "print(found or 'no-secret')"
    )
    assert os.environ[SECRET_NAME] == SECRET_VALUE  # the pool workers have it too
    bad, _ = run_adversarial(pool, stdio_item(["\n"], ["leaked"]), fenced(program))
    assert bad.score == 0.0
    if IS_ROOT:
        assert "got 'no-secret'" in bad.reason, bad.reason
    assert SECRET_VALUE not in repr(bad)


def test_killing_the_pool_and_trainer_is_refused(pool: RewardPool) -> None:
    targets = [os.getpid(), *pool.worker_pids()]
    program = ("import os, signal\n"
               f"for pid in {targets!r}:\n"
               "    os.kill(pid, signal.SIGKILL)\n"
               "print('5')")
    bad, _ = run_adversarial(pool, stdio_item(["\n"], ["5"]), fenced(program))
    if IS_ROOT:
        assert bad.score == 0.0 and "PermissionError" in bad.reason, bad.reason
    assert sorted(pool.worker_pids()) == sorted(targets[1:])  # no worker was replaced


def test_background_processes_do_not_outlive_the_run(pool: RewardPool) -> None:
    program = ("import os, time\n"
               "for _ in range(3):\n"
               "    if os.fork() == 0:\n"
               "        os.setsid()\n"
               "        time.sleep(600)\n"
               "        os._exit(0)\n"
               "print('5')")
    result, _ = run_adversarial(pool, stdio_item(["\n"], ["5"]), fenced(program))
    assert result.score == 1.0, result.reason  # it passes, and run_adversarial found no leftovers

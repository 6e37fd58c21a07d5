"""Reward pool: ordering, non-blocking submission, hung/dead workers, limits, clean shutdown."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tradojax.data.readers import MathTask, code_task_from_dict
from tradojax.rewards import RewardPool, RewardResult, SandboxLimits, score_responses
from tradojax.rewards.sandbox import list_sandbox_processes
from proc_tree import descendants

# A uid range of our own, so that leftover checks ignore concurrent test processes (xdist).
UID_BASE = 0x40000000 + (os.getpid() % 128) * (1 << 22)
LIMITS = SandboxLimits(memory_bytes=512 << 20, output_bytes=1 << 20, startup_s=3.0,
                       uid_base=UID_BASE)


def math_item(answer: str) -> dict:
    return {"question": "What is it?", "ground_truth_answer": answer}


def stdio_item(inputs: list[str], outputs: list[str], limit: float = 1.0) -> dict:
    return {"question": "q", "test_method": "stdio", "test_time_limit": limit,
            "test_input": inputs, "test_output": outputs}


def fenced(program: str) -> str:
    return f"```python\n{program}\n```"


def wait_ready(pool: RewardPool) -> list[int]:
    """Score one item so that every worker has started; return the worker pids."""
    pool.map("math", [math_item("1")] * pool.num_workers, ["\\boxed{1}"] * pool.num_workers)
    return pool.worker_pids()


def is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


@pytest.fixture(scope="module")
def pool():
    with RewardPool(2, math_time_limit_s=10.0, code_limits=LIMITS, code_slack_s=3.0) as shared:
        yield shared


def test_typed_tasks_score_as_their_json_forms(pool: RewardPool) -> None:
    """The data layer's MathTask / CodeTask go to the pool as they are (no dict round trip) and
    score exactly as their JSON forms do."""
    math_tasks = [MathTask("1+1?", "2"), MathTask("Half?", "0.5")]
    math_responses = ["\\boxed{2}", "\\boxed{1/3}"]
    code_task = code_task_from_dict({"question": "Double.", "test_method": "stdio", "test_input": ["2\n", "5\n"],
                                     "test_output": ["4", "10"]})
    code_responses = [fenced("print(2 * int(input()))"), fenced("print(4)")]
    for kind, tasks, responses in (("math", math_tasks, math_responses),
                                   ("code", [code_task, code_task], code_responses)):
        typed = pool.map(kind, tasks, responses)
        as_json = pool.map(kind, [t.to_dict() for t in tasks], responses)
        assert [(r.score, r.correct) for r in typed] == [(r.score, r.correct) for r in as_json]
    assert [r.correct for r in typed] == [True, False] and [r.score for r in typed] == [2.0, 1.0]


def test_results_come_back_in_input_order(pool: RewardPool) -> None:
    cases = [
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),  # needs math-verify (slower)
        ("\\boxed{3}", "3", 1.0),  # string match (fast)
        ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
        ("no answer", "4", 0.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{5}", "6", 0.0),
        ("\\boxed{[0, 1)}", "[0,1)", 1.0),
        ("\\boxed{-7}", "7", 0.0),
    ] * 3
    items = [math_item(truth) for _, truth, _ in cases]
    results = pool.map("math", items, [response for response, _, _ in cases])
    assert [r.score for r in results] == [score for _, _, score in cases]
    assert all(isinstance(r, RewardResult) for r in results)
    assert [r.details["ground_truth"] for r in results] == [truth for _, truth, _ in cases]


def test_submit_does_not_block(pool: RewardPool) -> None:
    wait_ready(pool)
    program = "import time\ntime.sleep(0.4)\nprint(int(input()) * 3)"
    items = [stdio_item([f"{k}\n"], [str(3 * k)]) for k in range(4)]
    start = time.monotonic()
    batch = pool.submit_batch("code", items, [fenced(program)] * 4)
    submitted = time.monotonic() - start
    assert submitted < 0.2
    assert not batch.done()
    single = pool.submit("math", math_item("2"), "\\boxed{2}")
    results = batch.result(timeout=30)
    assert [r.score for r in results] == [1.0] * 4
    assert single.result(timeout=30).score == 1.0
    assert batch.done()


def test_truncation_rule_through_the_pool(pool: RewardPool) -> None:
    results = pool.map("math", [math_item("9")] * 3, ["\\boxed{9}"] * 3,
                       response_lengths=[10, 250, 256], max_tokens=256)
    assert [r.score for r in results] == [1.0, 1.0, 0.0]
    assert "truncated" in results[2].reason and results[2].details["raw_correct"] is True


def test_bad_input_raises_in_the_caller(pool: RewardPool) -> None:
    with pytest.raises(ValueError, match="item 1: missing field 'ground_truth_answer'"):
        pool.submit_batch("math", [math_item("1"), {"question": "q"}], ["a", "b"])
    with pytest.raises(ValueError, match="item 0: field 'test_method'"):
        pool.submit("code", {"test_method": "unknown"}, "x")
    with pytest.raises(ValueError, match="kind must be one of"):
        pool.submit("poetry", math_item("1"), "x")
    with pytest.raises(ValueError, match="same length"):
        pool.map("math", [math_item("1")], ["a", "b"])
    with pytest.raises(ValueError, match="response must be a str"):
        pool.submit("math", math_item("1"), None)  # type: ignore[arg-type]


def test_pathological_latex_answered_within_limit() -> None:
    limit = 2.0
    inputs = {
        "deep_parens": "\\boxed{" + "(" * 2000 + "1" + ")" * 2000 + "}",
        "unbalanced_megabyte": "\\boxed{" + "{" * 1_000_000,
        "megabyte_answer": "\\boxed{" + "x^{" * 200_000 + "}" * 200_000 + "}",
        "megabyte_text": "lorem ipsum " * 90_000 + "\\boxed{\\dfrac{1}{2}}",
        "long_shallow_sum": "\\boxed{" + "+".join(["\\sqrt{2}"] * 120) + "}",
        "many_boxes": "\\fbox{1}" * 120_000 + "\\boxed{0.5}",
    }
    expected = {"megabyte_text": 1.0, "many_boxes": 1.0}
    with RewardPool(1, math_time_limit_s=limit) as local:
        wait_ready(local)
        for name, response in inputs.items():
            start = time.monotonic()
            result = local.submit("math", math_item("\\frac{1}{2}"), response).result(timeout=60)
            elapsed = time.monotonic() - start
            assert elapsed < limit + 3.0, f"{name}: {elapsed:.2f} s"
            assert result.score == expected.get(name, 0.0), f"{name}: {result.reason}"


def test_hung_worker_is_killed_and_replaced() -> None:
    with RewardPool(1, math_time_limit_s=1.0) as local:
        (old_pid,) = wait_ready(local)
        os.kill(old_pid, signal.SIGSTOP)  # the worker stops answering
        start = time.monotonic()
        result = local.submit("math", math_item("1"), "\\boxed{1}").result(timeout=30)
        elapsed = time.monotonic() - start
        assert (result.score, result.correct) == (0.0, False)
        assert "exceeded the 1 s limit" in result.reason
        assert 0.9 < elapsed < 4.0
        assert local.workers_replaced == 1
        assert not is_alive(old_pid)
        # The pool keeps serving with a fresh worker.
        assert local.submit("math", math_item("1"), "\\boxed{1}").result(timeout=30).score == 1.0
        assert local.worker_pids() != [old_pid]


def test_dead_worker_is_replaced() -> None:
    with RewardPool(1, math_time_limit_s=20.0) as local:
        (first,) = wait_ready(local)
        os.kill(first, signal.SIGKILL)  # dies while idle: no item is lost
        assert local.submit("math", math_item("2"), "\\boxed{2}").result(timeout=30).score == 1.0
        (second,) = local.worker_pids()
        os.kill(second, signal.SIGSTOP)
        future = local.submit("math", math_item("3"), "\\boxed{3}")
        time.sleep(0.2)
        os.kill(second, signal.SIGKILL)  # dies before it could start the item: retried
        assert future.result(timeout=30).score == 1.0
        assert local.submit("math", math_item("4"), "\\boxed{4}").result(timeout=30).score == 1.0
        assert local.workers_replaced == 2
        assert not is_alive(first) and not is_alive(second)


def test_killing_a_worker_mid_run_sweeps_its_sandbox() -> None:
    before = descendants(os.getpid())
    with RewardPool(1, code_limits=LIMITS) as local:
        (worker,) = wait_ready(local)
        before |= {worker}
        program = ("import os, time\n"
                   "if os.fork() == 0:\n"
                   "    os.setsid()\n"
                   "time.sleep(30)")
        future = local.submit("code", stdio_item(["\n"], ["x"], limit=20.0), fenced(program))
        deadline = time.monotonic() + 10
        while len(list_sandbox_processes(LIMITS.uid_base)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(list_sandbox_processes(LIMITS.uid_base)) >= 2
        os.kill(worker, signal.SIGKILL)
        result = future.result(timeout=30)
        assert result.score == 0.0 and "reward worker died" in result.reason
        assert list_sandbox_processes(LIMITS.uid_base) == []
        assert descendants(os.getpid()) - before - set(local.worker_pids()) == set()


def test_workers_are_recycled_after_max_tasks() -> None:
    with RewardPool(1, max_tasks_per_worker=2) as local:
        pids = set()
        for k in range(5):
            assert local.submit("math", math_item(str(k)), f"\\boxed{{{k}}}").result(
                timeout=30).score == 1.0
            pids.update(local.worker_pids())
        assert len(pids) >= 3
        assert local.workers_replaced == 0  # recycling is not a failure


def test_clean_shutdown_leaves_no_process(pool: RewardPool) -> None:
    before = descendants(os.getpid())
    local = RewardPool(2, code_limits=LIMITS)
    results = local.map("code", [stdio_item(["1\n"], ["1"])] * 2,
                        [fenced("print(input())"), fenced("while True: pass")])
    assert [r.score for r in results] == [1.0, 0.0]
    workers = local.worker_pids()
    assert len(workers) == 2
    local.close()
    local.close()  # idempotent
    assert not any(is_alive(pid) for pid in workers)
    # the module's shared pool may have started its own workers meanwhile: they are not leftovers
    shared = set(pool.worker_pids())
    shared |= {child for pid in shared for child in descendants(pid)}
    assert descendants(os.getpid()) - before - shared == set()
    assert list_sandbox_processes(LIMITS.uid_base) == []
    with pytest.raises(RuntimeError, match="closed"):
        local.submit("math", math_item("1"), "\\boxed{1}")


def test_close_can_cancel_pending_items() -> None:
    local = RewardPool(1, math_time_limit_s=1.0)
    (worker,) = wait_ready(local)
    os.kill(worker, signal.SIGSTOP)
    futures = [local.submit("math", math_item("1"), "\\boxed{1}") for _ in range(3)]
    time.sleep(0.1)
    local.close(cancel_pending=True)
    assert futures[0].result().score == 0.0  # in flight on the stopped worker: timed out
    assert all(f.cancelled() for f in futures[1:])
    assert not is_alive(worker)


def test_score_responses_entry_point(pool: RewardPool) -> None:
    items = [math_item("4"), math_item("\\frac{1}{3}"), math_item("10")]
    responses = ["\\boxed{4}", "\\boxed{0.333}", "\\boxed{10\\text{ cm}}"]
    with_pool = score_responses(items, responses, "math", pool=pool)
    without_pool = score_responses(items, responses, "math", num_workers=1)
    assert [r.score for r in with_pool] == [1.0, 0.0, 1.0]
    assert [r.score for r in without_pool] == [1.0, 0.0, 1.0]
    code = score_responses([stdio_item(["2\n"], ["4"])], [fenced("print(int(input()) ** 2)")],
                           "code", pool=pool)
    assert (code[0].score, code[0].correct) == (1.0, True)


def test_pool_argument_validation() -> None:
    with pytest.raises(ValueError, match="num_workers"):
        RewardPool(0)
    with pytest.raises(ValueError, match="math_time_limit_s"):
        RewardPool(1, math_time_limit_s=0)
    with pytest.raises(ValueError, match="max_tasks_per_worker"):
        RewardPool(1, max_tasks_per_worker=0)

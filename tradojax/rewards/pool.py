"""A host process pool that scores math and code responses while the device works.

`RewardPool` keeps ``num_workers`` worker processes, each a fresh interpreter started with
`subprocess` (never a fork of the trainer, which holds JAX threads; no re-import of the caller's
``__main__`` as with multiprocessing's spawn, and no helper process left behind). Workers talk to
the pool over two pipes with `multiprocessing.connection.Connection` framing. A dispatcher
thread hands each worker one item at a time and watches a per-item deadline:

* **non-blocking**: `RewardPool.submit` returns a `concurrent.futures.Future`, and
  `RewardPool.submit_batch` a `RewardBatch` whose ``result()`` lists results in input order;
  `RewardPool.map` and `score_responses` block;
* **per-item limits**: math items get ``math_time_limit_s``; code items get the sandbox's own
  budget (start-up plus every test at its limit) plus ``code_slack_s``;
* **recycling**: a worker that misses its deadline or dies is SIGKILLed together with its
  sandbox run (its runner's process group and sandbox uid) and replaced; only that item scores
  0, with the reason (an item the dead worker had not yet acknowledged is retried once).
  Workers are also replaced after ``max_tasks_per_worker`` items to bound memory growth
  (sympy caches);
* **clean shutdown**: ``close()`` (or leaving the ``with`` block) finishes queued items, stops
  every worker and leaves no process behind. Workers are started by the dispatcher thread with
  a parent-death signal, so they also die with the trainer; they ignore SIGINT (Ctrl-C is the
  trainer's to handle).

math-verify runs in the workers' main thread, so its ``signal.alarm`` timeouts work there; the
pool's deadline is the backstop for anything that ignores them (C-level regex or sympy work).
Bad task data raises `ValueError` in the caller at submit time (naming the item and field);
bad responses never raise, they score 0.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from tradojax.rewards import RewardResult
from tradojax.rewards.code import code_time_budget, parse_code_task, score_code
from tradojax.rewards.math import parse_math_task, score_math
from tradojax.rewards.sandbox import SandboxLimits, die_with_parent, kill_sandbox_run

Connection = multiprocessing.connection.Connection

logger = logging.getLogger(__name__)

KINDS = ("math", "code")
DEFAULT_MATH_TIME_LIMIT_S = 10.0
_START_FAILURES_BEFORE_BROKEN = 3
_WORKER_STOP_TIMEOUT_S = 5.0


@dataclass
class _Task:
    task_id: int
    kind: str
    payload: Any  # ground-truth string (math) or CodeTask (code)
    response: str
    options: dict[str, Any]
    time_limit_s: float
    future: Future
    attempts: int = 0


@dataclass
class _Worker:
    process: subprocess.Popen
    send_conn: Connection  # pool -> worker
    recv_conn: Connection  # worker -> pool
    ready: bool = False
    task: _Task | None = None
    task_started: bool = False  # the worker acknowledged receiving `task`
    deadline: float = float("inf")
    tasks_done: int = 0
    runner_pid: int = 0  # sandbox runner in flight (reported by the worker), 0 if none


class RewardBatch:
    """Futures of a submitted batch; `result()` returns the `RewardResult`s in input order."""

    def __init__(self, futures: list[Future]) -> None:
        self.futures = futures

    def __len__(self) -> int:
        return len(self.futures)

    def done(self) -> bool:
        """Whether every item has been scored."""
        return all(f.done() for f in self.futures)

    def result(self, timeout: float | None = None) -> list[RewardResult]:
        """Block until all items are scored (or `timeout` seconds pass: TimeoutError)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        results = []
        for future in self.futures:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            results.append(future.result(timeout=remaining))
        return results


class RewardPool:
    """Process pool for reward verification (see the module docstring).

    Args:
        num_workers: worker processes (default: CPU count, at least 1).
        math_time_limit_s: hard per-item limit for math items.
        code_limits: sandbox limits for code items.
        code_slack_s: extra seconds over the sandbox's own budget before a code worker is
            considered hung.
        max_tasks_per_worker: replace a worker after this many items.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        *,
        math_time_limit_s: float = DEFAULT_MATH_TIME_LIMIT_S,
        code_limits: SandboxLimits | None = None,
        code_slack_s: float = 5.0,
        max_tasks_per_worker: int = 256,
    ) -> None:
        if num_workers is None:
            num_workers = max(1, os.cpu_count() or 1)
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")
        if not math_time_limit_s > 0:
            raise ValueError(f"math_time_limit_s must be > 0, got {math_time_limit_s!r}")
        if not code_slack_s >= 0:
            raise ValueError(f"code_slack_s must be >= 0, got {code_slack_s!r}")
        if not isinstance(max_tasks_per_worker, int) or max_tasks_per_worker < 1:
            raise ValueError(f"max_tasks_per_worker must be a positive int, "
                             f"got {max_tasks_per_worker!r}")
        self.num_workers = num_workers
        self.math_time_limit_s = float(math_time_limit_s)
        self.code_limits = code_limits or SandboxLimits()
        self.code_slack_s = float(code_slack_s)
        self.max_tasks_per_worker = max_tasks_per_worker
        # Re-entrant: futures resolve under the lock, and their callbacks may submit more items.
        self._lock = threading.RLock()
        self._queue: collections.deque[_Task] = collections.deque()
        self._ids = itertools.count()
        self._closing = False
        self._closed = False
        self._broken: str | None = None
        self._start_failures = 0
        self.workers_replaced = 0  # hung or dead workers replaced (not counting recycling)
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._workers: list[_Worker] = []
        self._thread = threading.Thread(target=self._dispatch_loop, name="reward-pool",
                                        daemon=True)
        self._thread.start()

    # -- public API ---------------------------------------------------------------------------
    def submit(
        self,
        kind: str,
        item: Any,
        response: str,
        *,
        response_length: int | None = None,
        max_tokens: int | None = None,
    ) -> Future:
        """Queue one item; returns a Future of its `RewardResult`. Never blocks on scoring."""
        return self._submit_many(kind, [item], [response], [response_length], max_tokens)[0]

    def submit_batch(
        self,
        kind: str,
        items: Sequence[Any],
        responses: Sequence[str],
        *,
        response_lengths: Sequence[int] | None = None,
        max_tokens: int | None = None,
    ) -> RewardBatch:
        """Queue `items[i]` with `responses[i]` for all i; returns a `RewardBatch`."""
        if len(items) != len(responses):
            raise ValueError(f"items ({len(items)}) and responses ({len(responses)}) must "
                             "have the same length")
        if response_lengths is not None and len(response_lengths) != len(responses):
            raise ValueError(f"response_lengths ({len(response_lengths)}) and responses "
                             f"({len(responses)}) must have the same length")
        lengths = list(response_lengths) if response_lengths is not None else [None] * len(items)
        return RewardBatch(self._submit_many(kind, items, responses, lengths, max_tokens))

    def map(
        self,
        kind: str,
        items: Sequence[Any],
        responses: Sequence[str],
        *,
        response_lengths: Sequence[int] | None = None,
        max_tokens: int | None = None,
    ) -> list[RewardResult]:
        """Score all items (blocking); results in input order."""
        return self.submit_batch(kind, items, responses, response_lengths=response_lengths,
                                 max_tokens=max_tokens).result()

    def close(self, cancel_pending: bool = False) -> None:
        """Stop the pool: finish (or cancel) queued items, stop workers, leave no process."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("RewardPool.close() cannot be called from a result callback")
        with self._lock:
            if self._closed:
                return
            self._closing = True
            if cancel_pending:
                while self._queue:
                    self._queue.popleft().future.cancel()
        self._wake()
        self._thread.join()
        self._closed = True
        os.close(self._wake_read)
        os.close(self._wake_write)

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close(cancel_pending=exc_info[0] is not None)

    def worker_pids(self) -> list[int]:
        """Pids of the current worker processes (for monitoring and tests)."""
        with self._lock:
            return [w.process.pid for w in self._workers]

    # -- submission -----------------------------------------------------------------------
    def _submit_many(self, kind: str, items: Iterable[Any], responses: Iterable[str],
                     lengths: Iterable[int | None], max_tokens: int | None) -> list[Future]:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens <= 0):
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        tasks = []
        for index, (item, response, length) in enumerate(zip(items, responses, lengths)):
            where = f"item {index}"
            if not isinstance(response, str):
                raise ValueError(f"{where}: response must be a str, got {type(response).__name__}")
            if kind == "math":
                payload: Any = parse_math_task(item, where)
                limit = self.math_time_limit_s
                options = {"response_length": length, "max_tokens": max_tokens,
                           "time_budget_s": max(0.5, 0.6 * limit)}
            else:
                payload = parse_code_task(item, where)
                limit = code_time_budget(payload, self.code_limits) + self.code_slack_s
                options = {"limits": self.code_limits}
            tasks.append(_Task(next(self._ids), kind, payload, response, options, limit,
                               Future()))
        with self._lock:
            if self._closing:
                raise RuntimeError("RewardPool is closed")
            if self._broken:
                raise RuntimeError(f"RewardPool is broken: {self._broken}")
            self._queue.extend(tasks)
        self._wake()
        return [t.future for t in tasks]

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending (or the pool is closed)

    # -- dispatcher thread ------------------------------------------------------------------
    def _start_worker(self) -> _Worker:
        to_worker_read, to_worker_write = os.pipe()
        from_worker_read, from_worker_write = os.pipe()
        env = dict(os.environ)
        # The worker imports tradojax exactly as this process does.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        try:
            process = subprocess.Popen(
                [sys.executable, "-B", "-c",
                 "from tradojax.rewards.pool import _worker_entry; _worker_entry()",
                 str(to_worker_read), str(from_worker_write), str(os.getpid())],
                pass_fds=(to_worker_read, from_worker_write),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
                close_fds=True,
            )
        finally:
            os.close(to_worker_read)
            os.close(from_worker_write)
        return _Worker(process, Connection(to_worker_write, readable=False),
                       Connection(from_worker_read, writable=False))

    def _dispatch_loop(self) -> None:
        try:
            with self._lock:
                self._workers = [self._start_worker() for _ in range(self.num_workers)]
            self._run_dispatch()
        except BaseException as exc:  # noqa: BLE001 - never leave futures hanging
            logger.exception("reward pool dispatcher failed")
            self._fail_everything(f"reward pool dispatcher failed: {exc!r}")
        finally:
            for worker in list(self._workers):
                self._stop_worker(worker)
            self._workers = []

    def _run_dispatch(self) -> None:
        while True:
            now = time.monotonic()
            with self._lock:
                self._assign(now)
                if self._closing and not self._queue and all(w.task is None
                                                              for w in self._workers):
                    return
                busy_deadlines = [w.deadline for w in self._workers if w.task is not None]
                waitables = [self._wake_read] + [w.recv_conn for w in self._workers]
            timeout = None
            if busy_deadlines:
                timeout = max(0.0, min(busy_deadlines) - now)
            ready = multiprocessing.connection.wait(waitables, timeout)
            if self._wake_read in ready:
                try:
                    os.read(self._wake_read, 4096)
                except BlockingIOError:
                    pass
            with self._lock:
                for worker in list(self._workers):
                    if worker.recv_conn in ready:
                        self._service(worker)
                now = time.monotonic()
                for worker in list(self._workers):
                    if worker.task is not None and now >= worker.deadline:
                        limit = worker.task.time_limit_s
                        self._replace(worker, f"reward worker exceeded the {limit:g} s limit for "
                                              "this item; worker killed and replaced")

    def _assign(self, now: float) -> None:
        for worker in self._workers:
            if not self._queue:
                return
            if not worker.ready or worker.task is not None:
                continue
            task = self._queue.popleft()
            if not task.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            task.attempts += 1
            try:
                worker.send_conn.send(("task", task.task_id, task.kind, task.payload,
                                       task.response, task.options))
            except (BrokenPipeError, EOFError, OSError):
                # The worker died between tasks: not the item's fault, so retry it once.
                worker.task = task
                self._replace(worker, "reward worker died", retry=task.attempts < 2)
                continue
            worker.task = task
            worker.task_started = False
            worker.deadline = now + task.time_limit_s

    def _service(self, worker: _Worker) -> None:
        """Handle messages from a worker, or its death (end of file on its pipe)."""
        while True:
            try:
                if not worker.recv_conn.poll():
                    return
                message = worker.recv_conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "ready":
                worker.ready = True
                self._start_failures = 0
            elif message[0] == "started":
                if worker.task is not None and worker.task.task_id == message[1]:
                    worker.task_started = True
            elif message[0] == "runner":
                worker.runner_pid = message[1]
            elif message[0] == "result":
                _, task_id, result = message
                worker.runner_pid = 0
                task = worker.task
                if task is not None and task.task_id == task_id:
                    worker.task = None
                    worker.deadline = float("inf")
                    worker.tasks_done += 1
                    task.future.set_result(result)
                if worker.tasks_done >= self.max_tasks_per_worker and worker.task is None:
                    self._recycle(worker)
                    return
        try:
            code = worker.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            code = None  # closed its pipe but still running: killed below
        if not worker.ready:
            self._start_failures += 1
            if self._start_failures >= _START_FAILURES_BEFORE_BROKEN:
                self._broken = f"reward workers fail to start (exit code {code})"
                self._fail_pending_locked(self._broken)
        # A worker that died before acknowledging its item did not die of it: retry once.
        task = worker.task
        retry = task is not None and not worker.task_started and task.attempts < 2
        self._replace(worker, f"reward worker died (exit code {code}) while scoring this "
                              "item; worker replaced", retry=retry)

    def _replace(self, worker: _Worker, reason: str, retry: bool = False) -> None:
        task = worker.task
        worker.task = None
        self._kill_worker(worker)
        self.workers_replaced += 1
        if task is not None and not task.future.done():
            if retry:
                task.future = _rearm(task.future)
                self._queue.appendleft(task)
            else:
                task.future.set_result(RewardResult(
                    0.0, False, reason, {"error": "worker", "time_limit_s": task.time_limit_s}))
        index = self._workers.index(worker)
        if self._broken:
            self._workers.pop(index)
        else:
            self._workers[index] = self._start_worker()

    def _recycle(self, worker: _Worker) -> None:
        index = self._workers.index(worker)
        self._stop_worker(worker)
        self._workers[index] = self._start_worker()

    def _kill_worker(self, worker: _Worker) -> None:
        try:
            worker.process.kill()
        except OSError:
            pass
        if worker.runner_pid:
            kill_sandbox_run(worker.runner_pid, self.code_limits.uid_base)
        worker.process.wait()
        worker.send_conn.close()
        worker.recv_conn.close()

    def _stop_worker(self, worker: _Worker) -> None:
        try:
            worker.send_conn.send(None)
        except (OSError, ValueError):
            pass
        try:
            worker.process.wait(_WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._kill_worker(worker)
            return
        worker.send_conn.close()
        worker.recv_conn.close()

    def _fail_pending_locked(self, reason: str) -> None:
        while self._queue:
            task = self._queue.popleft()
            if task.future.set_running_or_notify_cancel():
                task.future.set_result(RewardResult(0.0, False, reason, {"error": "pool"}))

    def _fail_everything(self, reason: str) -> None:
        with self._lock:
            self._broken = reason
            self._fail_pending_locked(reason)
            for worker in self._workers:
                if worker.task is not None and not worker.task.future.done():
                    worker.task.future.set_result(RewardResult(0.0, False, reason,
                                                               {"error": "pool"}))
                    worker.task = None


def _rearm(future: Future) -> Future:
    # A future already marked running cannot go back to pending; a retried task gets a fresh
    # one that forwards its outcome to the one the caller holds.
    fresh: Future = Future()

    def forward(done: Future) -> None:
        if done.cancelled():
            future.set_result(RewardResult(0.0, False, "cancelled: the pool was closed",
                                           {"error": "pool"}))
        else:
            future.set_result(done.result())

    fresh.add_done_callback(forward)
    return fresh


# -- worker process ------------------------------------------------------------------------


def _worker_entry() -> None:
    """``python -c`` entry point of a worker: argv holds its two pipe fds and the pool's pid."""
    read_fd, write_fd, parent_pid = (int(arg) for arg in sys.argv[1:4])
    _worker_main(Connection(read_fd, writable=False), Connection(write_fd, readable=False),
                 parent_pid)


def _worker_main(recv_conn: Connection, send_conn: Connection, parent_pid: int) -> None:
    """Worker loop: receive (kind, payload, response, options), reply with a RewardResult."""
    die_with_parent()
    if os.getppid() != parent_pid:
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    score_math("\\boxed{2\\sqrt{2}}", "\\sqrt{8}")  # import and warm up math-verify, sympy
    send_conn.send(("ready", os.getpid()))

    def note_runner(pid: int) -> None:
        send_conn.send(("runner", pid))

    while True:
        try:
            message = recv_conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        _, task_id, kind, payload, response, options = message
        send_conn.send(("started", task_id))
        try:
            if kind == "math":
                result = score_math(response, payload, **options)
            else:
                result = score_code(payload, response, limits=options["limits"],
                                    on_runner_start=note_runner)
        except Exception as exc:  # noqa: BLE001 - a verifier bug costs one item, not the run
            result = RewardResult(0.0, False, f"verifier error: {type(exc).__name__}: {exc}",
                                  {"error": "verifier"})
        send_conn.send(("result", task_id, result))


# -- entry point ---------------------------------------------------------------------------


def score_responses(
    items: Sequence[Any],
    responses: Sequence[str],
    kind: str,
    *,
    pool: RewardPool | None = None,
    response_lengths: Sequence[int] | None = None,
    max_tokens: int | None = None,
    num_workers: int | None = None,
    code_limits: SandboxLimits | None = None,
) -> list[RewardResult]:
    """Score ``responses[i]`` against ``items[i]`` through a `RewardPool`; results in order.

    Args:
        items: `MathTask`s / `CodeTask`s (tradojax.data) or their JSON dicts (spec 7).
        responses: decoded response texts, one per item (repeat an item for k responses).
        kind: "math" or "code".
        pool: a running pool to use; without one, a temporary pool is started and closed.
        response_lengths: generated token counts, for the math truncation rule.
        max_tokens: the rollout's generation limit, for the math truncation rule.
        num_workers, code_limits: settings of the temporary pool.
    """
    if pool is not None:
        return pool.map(kind, items, responses, response_lengths=response_lengths,
                        max_tokens=max_tokens)
    workers = num_workers or max(1, min(len(responses), os.cpu_count() or 1))
    with RewardPool(workers, code_limits=code_limits) as temporary:
        return temporary.map(kind, items, responses, response_lengths=response_lengths,
                             max_tokens=max_tokens)


__all__ = ["DEFAULT_MATH_TIME_LIMIT_S", "KINDS", "RewardBatch", "RewardPool", "score_responses"]

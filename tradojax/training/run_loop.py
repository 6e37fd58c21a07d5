"""The run-loop shell every trainer shares (SFT, RL, and any later one).

A trainer supplies the step body and its state; the shell owns everything around the steps:

* placement: the data-parallel batch check, parameters sharded by the "train" rules, optimizer
  state beside them, host batches split over the mesh's data axes;
* the loop: `save_every` / `eval_every` scheduling (and always at the last step), the metric writer
  (`tradojax.metrics.MetricWriter`), `on_step` / `on_phase` reporting on process 0 only;
* SIGTERM (a preempted VM): the current step finishes, is saved, and `Preempted` is raised; the
  handler is installed from the main thread only (signals reach no other);
* checkpoints: save, and resume from the newest intact step (`restore_latest_good`: a damaged step
  is skipped with a message and set aside);
* the compiled-update cache (a second trainer of the same model and optimizer compiles nothing);
* the live progress display of the commands (rich; a terminal only) and their one JSON line per step.

The trainer side is the `StepBody` protocol: `train_step` runs one step and advances `step`;
`evaluate` returns eval metrics; `save` / `restore` go through `RunLoop.save` / `RunLoop.restore`.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Protocol, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from tradojax.checkpoint import CheckpointError, Preempted, TrainCheckpointer
from tradojax.config import ConfigError, TrainConfig
from tradojax.metrics import MetricWriter
from tradojax.parallel.mesh import data_parallel_size
from tradojax.parallel.sharding import place_state, shard_batch, shard_params

__all__ = ["Preempted", "RunLoop", "StepBody", "check_batch_fits_mesh", "compiled_update", "eval_metrics",
           "first_device", "live_progress"]


class StepBody(Protocol):
    """What a trainer gives the shell."""

    step: int  # updates done
    history: list[dict]  # one record per step done

    def train_step(self, resources: Any) -> dict:
        """One step (advancing `step`); returns its metrics record."""

    def evaluate(self, resources: Any) -> dict:
        """Eval metrics of the current parameters, merged into the step's record."""

    def save(self) -> None: ...

    def restore(self) -> bool: ...


# ----------------------------------------------------------------------------------------------
# Placement
# ----------------------------------------------------------------------------------------------


def check_batch_fits_mesh(train: TrainConfig, mesh: Mesh | None) -> None:
    """ConfigError unless the batch (and micro-batch) split evenly over the mesh's data axes."""
    if mesh is None:
        return
    dp = data_parallel_size(mesh)
    if train.batch_size % dp or (train.micro_batch_size and train.micro_batch_size % dp):
        raise ConfigError(f"train.batch_size={train.batch_size} (and micro_batch_size) must be divisible by "
                          f"the mesh's data-parallel size {dp}")


def first_device(tree: Any) -> jax.Device:
    leaf = jax.tree.leaves(tree)[0]
    return next(iter(leaf.devices())) if hasattr(leaf, "devices") else jax.devices()[0]


# ----------------------------------------------------------------------------------------------
# Compiled updates, shared by trainers of one process
# ----------------------------------------------------------------------------------------------

_UPDATES: dict[Any, Any] = {}


def compiled_update(key: Any, build: Callable[[], Any]) -> Any:
    """`build()` once per hashable `key` (model graph, optimizer settings, loss) in this process, so
    a second trainer (a resume, an adaptation run, tests) reuses the compiled update."""
    if key not in _UPDATES:
        _UPDATES[key] = build()
    return _UPDATES[key]


# ----------------------------------------------------------------------------------------------
# Eval metric names
# ----------------------------------------------------------------------------------------------


def eval_metrics(results: Iterable[Any], prefix: str = "eval/",
                 fields: Sequence[str] = ("accuracy", "mean_length")) -> dict[str, float]:
    """`{prefix}{strategy}_k{top_k}/{field}` for each `EvalResult` (or its summary dict)."""
    record = {}
    for result in results:
        get = result.get if isinstance(result, dict) else lambda name, r=result: getattr(r, name)
        tag = f"{prefix}{get('strategy')}_k{get('top_k')}"
        for name in fields:
            record[f"{tag}/{name}"] = get(name)
    return record


# ----------------------------------------------------------------------------------------------
# The shell
# ----------------------------------------------------------------------------------------------


class RunLoop:
    """Placement, checkpoints, SIGTERM and the step loop of one trainer writing to `workdir`.

    `label` names the trainer in messages ("SFT": "resumed SFT from ...", "saved SFT step 3");
    `metrics_file` and `tb_prefix` go to the `MetricWriter`.
    """

    def __init__(self, workdir: str | Path, *, mesh: Mesh | None = None, log: Callable[[str], None] = print,
                 label: str = "", metrics_file: str = "metrics.jsonl", tb_prefix: str = ""):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mesh = mesh
        self.log = log
        self.label = label
        self.metrics_file, self.tb_prefix = metrics_file, tb_prefix
        self.checkpointer = TrainCheckpointer(self.workdir / "checkpoints", log=log)
        self.stop_requested = False
        self._on_phase: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ placement

    def shard_params(self, params: Any) -> Any:
        """Parameters laid out by the "train" rules on the mesh (or committed to one device)."""
        if self.mesh is not None:
            return shard_params(params, self.mesh, "train")
        return place_state(params, None, first_device(params))

    def place_state(self, tree: Any, beside: Any) -> Any:
        """Optimizer state (and the like) on the devices of the parameters `beside`."""
        return place_state(tree, self.mesh, first_device(beside))

    def place_batch(self, tree: Any) -> Any:
        """Host rows (or extras) on the devices: the batch axis split over the mesh's data axes."""
        return jax.tree.map(jnp.asarray, tree) if self.mesh is None else shard_batch(tree, self.mesh)

    # ------------------------------------------------------------------ checkpoints

    def save(self, step: int, trees: dict[str, Any], meta: dict) -> None:
        self.checkpointer.save(step, trees, meta)

    def restore(self, targets: dict[str, Any], *,
                refuse: Callable[[dict], str | None] | None = None) -> tuple[int, dict[str, Any], dict] | None:
        """(step, trees, meta) of the newest intact checkpoint, None when there is none. Damaged
        steps are skipped with a message (and set aside). `refuse(meta)` may name why a step cannot
        be continued by this trainer (other data...): a CheckpointError, nothing skipped."""
        if self.checkpointer.latest_step() is None:
            return None

        class Refused(Exception):  # not a CheckpointError: restore_latest_good must not skip it
            pass

        def checked_targets(meta: dict) -> dict[str, Any]:
            problem = refuse(meta) if refuse is not None else None
            if problem is not None:
                raise Refused(problem)
            return targets

        try:
            step, trees, meta = self.checkpointer.restore_latest_good(checked_targets)
        except Refused as err:
            raise CheckpointError(str(err)) from None
        self.log(f"resumed {self.label + ' ' if self.label else ''}from {self.checkpointer.directory}/{step} "
                 f"(step {int(meta['step'])})")
        return step, trees, meta

    # ------------------------------------------------------------------ reporting

    def phase(self, name: str) -> None:
        """Reports that phase `name` starts (process 0, during `run` with `on_phase`)."""
        if self._on_phase is not None:
            self._on_phase(name)

    # ------------------------------------------------------------------ the loop

    def run(self, trainer: StepBody, *, steps: int, save_every: int, eval_every: int, resume: bool = False,
            resources: Callable[[], ContextManager[Any]] | None = None,
            on_step: Callable[[dict], None] | None = None,
            on_phase: Callable[[str], None] | None = None) -> list[dict]:
        """Runs `trainer` to `steps` steps. Saves every `save_every` steps, at the last one and on
        SIGTERM (then raises `Preempted`); evaluates every `eval_every` and at the last (0: never).
        `resources()` opens what the steps and evals share (a reward pool), passed to both.
        `on_step` gets each record, `on_phase` each phase name (eval, checkpoint, and the
        trainer's own through `phase`): on process 0 only, which reports for all hosts."""
        reporting = jax.process_index() == 0
        self._on_phase = on_phase if reporting else None
        try:
            if resume:
                trainer.restore()
            with contextlib.ExitStack() as stack:
                stack.enter_context(self._sigterm_handler())
                writer = stack.enter_context(MetricWriter(self.workdir, self.metrics_file, history=trainer.history,
                                                          tb_prefix=self.tb_prefix))
                shared = stack.enter_context(resources()) if resources is not None else None
                while trainer.step < steps:
                    start = time.perf_counter()
                    record = trainer.train_step(shared)
                    if eval_every and (trainer.step % eval_every == 0 or trainer.step == steps):
                        self.phase("eval")
                        record |= trainer.evaluate(shared)
                    record["step_s"] = time.perf_counter() - start
                    trainer.history.append(record)
                    writer.write(record)
                    if on_step is not None and reporting:
                        on_step(record)
                    at_save = save_every and (trainer.step % save_every == 0 or trainer.step == steps)
                    if at_save or self.stop_requested:
                        self.phase("checkpoint")
                        trainer.save()
                    if self.stop_requested:
                        raise Preempted(f"SIGTERM: saved {self.label + ' ' if self.label else ''}step {trainer.step} "
                                        f"to {self.checkpointer.directory}")
        finally:
            self._on_phase = None
        return trainer.history

    @contextlib.contextmanager
    def _sigterm_handler(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return

        def on_sigterm(signum, frame):
            self.log("SIGTERM received: finishing this step, then saving and exiting")
            self.stop_requested = True

        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------------
# The commands' live display
# ----------------------------------------------------------------------------------------------


class _Progress:
    """`on_step` / `on_phase` for `RunLoop.run`: a rich bar on stderr, a JSON line per step on stdout."""

    def __init__(self, bar, task, shown: Callable[[dict], dict], headline: Callable[[dict], str] | None):
        self.bar, self.task, self.shown, self.headline = bar, task, shown, headline

    def on_step(self, record: dict) -> None:
        self.bar.update(self.task, completed=record["step"],
                        headline=self.headline(record) if self.headline is not None else "")
        shown = self.shown(record)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in shown.items()}), flush=True)

    def on_phase(self, name: str) -> None:
        self.bar.update(self.task, phase=name)


@contextlib.contextmanager
def live_progress(title: str, total: int, *, keys: Sequence[str], headline: Callable[[dict], str] | None = None,
                  completed: int = 0):
    """A live bar (a terminal only) and one JSON line per step of the record's `keys` and eval
    accuracies, rounded to 4 decimals, for logs and scripts. Yields the `_Progress` reporter."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    def shown(record: dict) -> dict:
        return {k: v for k, v in record.items()
                if k in keys or (k.startswith("eval/") and k.endswith("/accuracy"))}

    with Progress(TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                  TextColumn("{task.fields[phase]:<10}"), TextColumn("{task.fields[headline]}"), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task(title, total=total, completed=completed, phase="", headline="")
        yield _Progress(bar, task, shown, headline)

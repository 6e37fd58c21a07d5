"""Evaluation (spec section 8): sample k responses per task over a sweep of (strategy, top_k)
pairs, score them in the reward pool, and report accuracy (avg@k), pass@k for code, average
length and tokens per denoising step. Used by `tradojax eval` and by the RL and SFT loops.

The tasks go through the sampler of the model's family in chunks of `eval.chunk_tasks` tasks:
the block-diffusion engine for SDAR/TraDo, the full-attention sampler for LLaDA and Dream
(`sampling.full_diffusion.sampler_for`); the sampler's own `sampling.max_active` bounds what is
resident on the devices, as in an RL rollout. With a
stream file, every chunk's scored responses are appended to it (one JSON line per response) as
soon as the chunk is scored, so a killed eval loses at most the chunk in flight; a rerun with the
same stream skips the chunks it already holds. Chunk c samples with `fold_in(key(seed), c)` (chunk
0 with `key(seed)` itself, so an eval of one chunk draws as one `generate(..., rng=seed)` call): the
results depend on the seed and on `chunk_tasks`, not on how often the run was interrupted.

Multi-host: every process runs every chunk on the shared mesh; process 0 alone writes the stream
and decides which chunks are done (then told to the others), so only its results include
responses read back from an earlier run.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from tradojax.bootstrap import bootstrap, check_tokenizer_matches
from tradojax.config import Config, ConfigError, SamplingConfig, to_dict
from tradojax.data.readers import CodeTask, MathTask
from tradojax.data.tasks import load_tasks, task_kind
from tradojax.data.templates import task_prompt
from tradojax.models.loading import load_policy
from tradojax.rewards import RewardPool, score_responses
from tradojax.sampling.full_diffusion import sampler_for

STREAM_FORMAT = "tradojax-eval-stream/1"


@dataclasses.dataclass(frozen=True)
class EvalResult:
    strategy: str
    top_k: int
    accuracy: float  # mean correctness over all k * tasks responses (avg@k)
    pass_at_k: float  # fraction of tasks with at least one correct response
    mean_length: float
    tokens_per_step: float  # generated tokens per denoising step (parallelism of decoding)
    num_tasks: int
    num_samples: int
    seconds: float
    responses: list[dict] = dataclasses.field(default_factory=list, repr=False)

    def summary(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "responses"}


def task_items(tasks: Sequence[MathTask | CodeTask]) -> list[dict]:
    return [task.to_dict() for task in tasks]


def eval_sampling(config: Config, strategy: str, top_k: int) -> SamplingConfig:
    """The sampler settings of one (strategy, top_k) run of the sweep (also what `tradojax aot` compiles)."""
    return dataclasses.replace(config.sampling, remasking_strategy=strategy, top_k=top_k,
                               num_samples=config.eval.num_samples,
                               max_new_tokens=config.eval.max_new_tokens or config.sampling.max_new_tokens)


def chunk_rng(seed: int, chunk: int) -> jax.Array:
    """The sampling key of chunk `chunk` (chunk 0: `key(seed)`, as an unchunked eval draws)."""
    key = jax.random.key(seed)
    return key if chunk == 0 else jax.random.fold_in(key, chunk)


# ----------------------------------------------------------------------------------------------
# The stream: one JSON line per scored response, one per finished chunk
# ----------------------------------------------------------------------------------------------


class EvalStream:
    """An append-only JSONL record of an eval in progress.

    Line 1 describes the run (`run`: what the results depend on); then, per finished chunk, one
    `{"item": ...}` line per response followed by one `{"chunk": ...}` line. A chunk counts as
    done only once its chunk line is written; lines that do not parse (a write cut short by a
    kill) are ignored. Only process 0 writes.
    """

    def __init__(self, path: str | Path, run: dict):
        self.path = Path(path)
        self.run = run
        self.items: dict[tuple[str, int, int, int], dict] = {}  # (strategy, top_k, task, sample) -> record
        self.chunks: dict[tuple[str, int, int], dict] = {}  # (strategy, top_k, chunk) -> record
        self.writer = jax.process_index() == 0
        if self.writer and self.path.exists() and self.path.stat().st_size:
            self._read()
        elif self.writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append([{"format": STREAM_FORMAT, "run": run}])

    def _read(self) -> None:
        lines = self.path.read_text().splitlines()
        try:
            header = json.loads(lines[0])
        except (json.JSONDecodeError, IndexError):
            header = {}
        if header.get("format") != STREAM_FORMAT:
            raise ConfigError(f"{self.path}: not a tradojax eval stream (line 1); remove it or choose another --out")
        for name, value in self.run.items():
            if header["run"].get(name) != value:
                raise ConfigError(f"{self.path}: written by a different eval ({name}: {header['run'].get(name)!r} "
                                  f"there, {value!r} now); remove it (or pass --fresh) to start over, or choose "
                                  "another --out")
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if "item" in record:
                item = record["item"]
                self.items[(item["strategy"], item["top_k"], item["task"], item["sample"])] = item
            elif "chunk" in record:
                chunk = record["chunk"]
                self.chunks[(chunk["strategy"], chunk["top_k"], chunk["chunk"])] = chunk

    def _append(self, records: list[dict]) -> None:
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():  # after a kill mid-line, start on a fresh line
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write("".join(json.dumps(r) + "\n" for r in records).encode())
            f.flush()
            os.fsync(f.fileno())

    def done_chunks(self, strategy: str, top_k: int, count: int) -> np.ndarray:
        """[count] bool: chunks already in the stream (decided on process 0, the same on every host)."""
        done = np.array([(strategy, top_k, c) in self.chunks for c in range(count)], bool)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            done = np.asarray(multihost_utils.broadcast_one_to_all(done))
        return done

    def add_chunk(self, chunk: dict, items: list[dict]) -> None:
        for item in items:
            self.items[(item["strategy"], item["top_k"], item["task"], item["sample"])] = item
        self.chunks[(chunk["strategy"], chunk["top_k"], chunk["chunk"])] = chunk
        if self.writer:
            self._append([{"item": item} for item in items] + [{"chunk": chunk}])


def stream_run(config: Config, prompts: Sequence[Sequence[int]], items: Sequence[dict], seed: int) -> dict:
    """What an eval's results depend on (a stream written under different values is refused)."""
    digest = hashlib.sha256(json.dumps([list(map(int, p)) for p in prompts]).encode())
    digest.update(json.dumps(list(items), sort_keys=True, default=str).encode())
    return {"tasks": len(prompts), "tasks_sha256": digest.hexdigest(), "seed": int(seed),
            "sampling": to_dict(config.sampling), "eval": {k: v for k, v in to_dict(config.eval).items()
                                                           if k not in ("output", "num_tasks")},
            "model": to_dict(config.model), "hf_checkpoint": config.hf_checkpoint}


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[MathTask | CodeTask],
    config: Config,
    *,
    params=None,
    pool=None,
    mesh=None,
    seed: int = 0,
    keep_responses: bool = False,
    progress: bool = False,
    stream: str | Path | None = None,
    on_chunk: Callable[[dict], None] | None = None,
) -> list[EvalResult]:
    """Runs the config's eval sweep over `tasks` with `model` (or `params` on its graph).

    Args:
      mesh: the device mesh the sampler shards its rows over (None: one device).
      stream: a JSONL file that receives every scored response as its chunk finishes; chunks it
        already holds (from an interrupted run with the same settings) are not sampled again.
      on_chunk: called after every finished chunk with its record (strategy, top_k, chunk, tasks,
        seconds); an exception it raises stops the eval (what a kill does, for tests).
    """
    kind = task_kind(tasks)
    if config.eval.num_tasks:
        tasks = list(tasks)[: config.eval.num_tasks]
    prompts = [list(task_prompt(tokenizer, t, start_with_think=config.data.start_with_think,
                                strip_final_newline=config.data.strip_final_newline).token_ids) for t in tasks]
    items = task_items(tasks)
    k, chunk_tasks = config.eval.num_samples, config.eval.chunk_tasks
    chunks = [range(start, min(start + chunk_tasks, len(tasks))) for start in range(0, len(tasks), chunk_tasks)]
    record = EvalStream(stream, stream_run(config, prompts, items, seed)) if stream is not None else None
    results = []
    for strategy, top_k in zip(config.eval.strategies, config.eval.top_k):
        sampling = eval_sampling(config, strategy, top_k)
        sampler = sampler_for(model, sampling, mesh=mesh)  # by family: full attention or block diffusion
        done = (record.done_chunks(strategy, top_k, len(chunks)) if record is not None
                else np.zeros(len(chunks), bool))
        responses: dict[tuple[int, int], dict] = {}
        seconds = 0.0
        if record is not None:
            responses = {(t, s): item for (st, tk, t, s), item in record.items.items() if (st, tk) == (strategy, top_k)}
            seconds = sum(c["seconds"] for (st, tk, c_index), c in record.chunks.items()
                          if (st, tk) == (strategy, top_k) and c_index < len(chunks) and done[c_index])
        bar = None
        if progress:
            resumed = sum(len(chunks[c]) for c in np.flatnonzero(done))
            bar = _progress_bar(f"eval {strategy} top_k={top_k}", len(tasks), resumed)
        for c, task_range in enumerate(chunks):
            if done[c]:
                continue
            start = time.perf_counter()
            rollout = sampler.generate([prompts[t] for t in task_range], rng=chunk_rng(seed, c),
                                       params=params).to_numpy()
            texts = [tokenizer.decode(r, skip_special_tokens=False) for r in rollout.responses()]
            tasks_of_rows = [task_range[i] for i in rollout.prompt_index]
            scored = score_responses([tasks[t] for t in tasks_of_rows], texts, kind, pool=pool,
                                     response_lengths=rollout.lengths.tolist(),
                                     max_tokens=sampling.max_new_tokens if config.eval.truncation_penalty else None)
            chunk_items = [{"strategy": strategy, "top_k": top_k, "task": int(t), "sample": r % k, "text": text,
                            "correct": bool(s.correct), "score": float(s.score), "reason": s.reason,
                            "length": int(n), "steps": int(steps)}
                           for r, (t, text, s, n, steps) in enumerate(zip(tasks_of_rows, texts, scored, rollout.lengths,
                                                                          rollout.num_steps))]
            chunk = {"strategy": strategy, "top_k": top_k, "chunk": c, "tasks": [task_range.start, task_range.stop],
                     "seconds": time.perf_counter() - start}
            seconds += chunk["seconds"]
            responses.update({(item["task"], item["sample"]): item for item in chunk_items})
            if record is not None:
                record.add_chunk(chunk, chunk_items)
            if bar is not None:
                bar(len(task_range))
            if on_chunk is not None:
                on_chunk(chunk)
        if bar is not None:
            bar(None)
        results.append(_summarise(strategy, top_k, responses, len(tasks), k, seconds, keep_responses))
    return results


def _summarise(strategy: str, top_k: int, responses: dict[tuple[int, int], dict], num_tasks: int, k: int,
               seconds: float, keep_responses: bool) -> EvalResult:
    """The sweep point's figures from its responses (all of them on process 0)."""
    ordered = [responses[key] for key in sorted(responses)]
    correct = np.zeros((num_tasks, k), bool)
    for item in ordered:
        correct[item["task"], item["sample"]] = item["correct"]
    lengths = np.array([item["length"] for item in ordered], np.float64)
    steps = sum(item["steps"] for item in ordered)
    return EvalResult(
        strategy=strategy, top_k=top_k, accuracy=float(correct.mean()), pass_at_k=float(correct.any(1).mean()),
        mean_length=float(lengths.mean()) if len(lengths) else 0.0,
        tokens_per_step=float(lengths.sum() / max(steps, 1)), num_tasks=num_tasks, num_samples=k, seconds=seconds,
        responses=[{"task": item["task"], "text": item["text"], "correct": item["correct"], "reason": item["reason"],
                    "length": item["length"]} for item in ordered] if keep_responses else [],
    )


def _progress_bar(label: str, total: int, completed: int) -> Callable[[int | None], None]:
    """A rich bar over tasks on stderr (process 0, a terminal); call with tasks done, None to close."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("tasks"),
                   TimeElapsedColumn(), console=Console(stderr=True),
                   disable=jax.process_index() != 0 or not sys.stderr.isatty())
    bar.start()
    task = bar.add_task(label, total=total, completed=completed)

    def advance(tasks_done: int | None) -> None:
        if tasks_done is None:
            bar.stop()
        else:
            bar.advance(task, tasks_done)

    return advance


def format_table(results: Sequence[EvalResult]) -> str:
    header = f"{'strategy':<24} {'top_k':>5} {'acc (avg@k)':>11} {'pass@k':>7} {'avg len':>8} {'tok/step':>8} {'tasks':>6} {'k':>3} {'sec':>6}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.strategy:<24} {r.top_k:>5} {r.accuracy:>11.3f} {r.pass_at_k:>7.3f} {r.mean_length:>8.1f} "
                     f"{r.tokens_per_step:>8.2f} {r.num_tasks:>6} {r.num_samples:>3} {r.seconds:>6.1f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """`tradojax eval --config FILE [--config.x=y ...] [--data FILE] [--out FILE] [--fresh]`."""
    parser = argparse.ArgumentParser(prog="tradojax eval", description="evaluate a model on a task set")
    parser.add_argument("--data", help="a task file (overrides data.eval): .json/.jsonl/.parquet")
    parser.add_argument("--kind", choices=("math", "code"), help="task kind of --data (overrides data.kind)")
    parser.add_argument("--out", help="results JSON (default: eval.output or <workdir>/eval.json); the scored "
                                      "responses stream to the same path with .jsonl, and a rerun resumes from it")
    parser.add_argument("--responses", action="store_true", help="keep every response in the JSON")
    parser.add_argument("--fresh", action="store_true", help="discard the stream of an earlier run instead of resuming")

    def flags_to_overrides(args: argparse.Namespace, overrides: list[str]) -> None:
        if args.data:
            overrides.append(f"data.eval={args.data}")
        if args.kind:
            overrides.append(f"data.kind={args.kind}")

    setup = bootstrap(argv, parser, check=flags_to_overrides)
    config, args, tokenizer, mesh = setup.config, setup.args, setup.tokenizer, setup.mesh
    tasks = load_tasks(config.data, "eval")
    model = load_policy(config, mesh=mesh)
    check_tokenizer_matches(model.config, tokenizer, setup.special_ids)
    out = Path(args.out or config.eval.output or Path(config.experiment.workdir) / "eval.json")
    stream = out.with_suffix(".jsonl")
    primary = jax.process_index() == 0
    if args.fresh and primary and stream.exists():
        stream.unlink()
    with RewardPool(num_workers=config.rl.reward_workers) as pool:
        results = evaluate(model, tokenizer, tasks, config, pool=pool, mesh=mesh, seed=config.experiment.seed,
                           keep_responses=args.responses, progress=True, stream=stream)
    if not primary:
        return 0
    print(format_table(results))
    out.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"config": setup.config_path, "overrides": setup.overrides, "data": config.data.eval,
                               "stream": str(stream),
                               "results": [r.summary() | ({"responses": r.responses} if args.responses else {})
                                           for r in results]}
    out.write_text(json.dumps(payload, indent=2))
    print(f"results: {out} (every scored response: {stream})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

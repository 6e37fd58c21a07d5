"""Evaluation (spec section 8): sample k responses per task over a sweep of (strategy, top_k)
pairs, score them in the reward pool, and report accuracy (avg@k), pass@k for code, average
length and tokens per denoising step. Used by `tradojax eval` and by the RL loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tradojax.config import Config, load_config, split_config_args
from tradojax.data.readers import CodeTask, MathTask


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
) -> list[EvalResult]:
    """Runs the config's eval sweep over `tasks` with `model` (or `params` on its graph)."""
    from tradojax.data.tasks import task_kind
    from tradojax.data.templates import task_prompt
    from tradojax.rewards import score_responses
    from tradojax.sampling.block_diffusion import BlockDiffusionSampler

    kind = task_kind(tasks)
    if config.eval.num_tasks:
        tasks = list(tasks)[: config.eval.num_tasks]
    prompts = [list(task_prompt(tokenizer, t, start_with_think=config.data.start_with_think,
                                strip_final_newline=config.data.strip_final_newline).token_ids) for t in tasks]
    items = task_items(tasks)
    k = config.eval.num_samples
    max_new = config.eval.max_new_tokens or config.sampling.max_new_tokens
    results = []
    for strategy, top_k in zip(config.eval.strategies, config.eval.top_k):
        sampling = dataclasses.replace(config.sampling, remasking_strategy=strategy, top_k=top_k,
                                       num_samples=k, max_new_tokens=max_new)
        start = time.perf_counter()
        sampler = BlockDiffusionSampler(model, sampling, mesh=mesh)
        callback = _progress_printer(f"eval {strategy} top_k={top_k}") if progress else None
        rollout = sampler.generate(prompts, rng=seed, params=params, progress=callback).to_numpy()
        responses = rollout.responses()
        texts = [tokenizer.decode(r, skip_special_tokens=False) for r in responses]
        row_items = [items[i] for i in rollout.prompt_index]
        scored = score_responses(row_items, texts, kind, pool=pool, response_lengths=rollout.lengths.tolist(),
                                 max_tokens=max_new if config.eval.truncation_penalty else None)
        correct = np.array([r.correct for r in scored], bool).reshape(len(tasks), k)
        lengths = rollout.lengths.astype(np.float64)
        result = EvalResult(
            strategy=strategy, top_k=top_k, accuracy=float(correct.mean()), pass_at_k=float(correct.any(1).mean()),
            mean_length=float(lengths.mean()), tokens_per_step=float(lengths.sum() / max(rollout.num_steps.sum(), 1)),
            num_tasks=len(tasks), num_samples=k, seconds=time.perf_counter() - start,
            responses=[{"task": int(i), "text": t, "correct": bool(r.correct), "reason": r.reason,
                        "length": int(n)} for i, t, r, n in zip(rollout.prompt_index, texts, scored, rollout.lengths)]
            if keep_responses else [],
        )
        results.append(result)
    return results


def _progress_printer(label: str):
    from tqdm import tqdm

    bar = tqdm(desc=label, unit="row", leave=False)

    def update(p):
        bar.total = p.rows_total
        bar.n = p.rows_done
        bar.set_postfix(tokens=p.tokens_generated, forwards=p.forwards)
        bar.refresh()
        if p.rows_done == p.rows_total:
            bar.close()

    return update


def format_table(results: Sequence[EvalResult]) -> str:
    header = f"{'strategy':<24} {'top_k':>5} {'acc (avg@k)':>11} {'pass@k':>7} {'avg len':>8} {'tok/step':>8} {'tasks':>6} {'k':>3} {'sec':>6}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.strategy:<24} {r.top_k:>5} {r.accuracy:>11.3f} {r.pass_at_k:>7.3f} {r.mean_length:>8.1f} "
                     f"{r.tokens_per_step:>8.2f} {r.num_tasks:>6} {r.num_samples:>3} {r.seconds:>6.1f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """`tradojax eval --config FILE [--config.x=y ...] [--data FILE] [--out FILE]`."""
    config_path, overrides, rest = split_config_args(argv)
    parser = argparse.ArgumentParser(prog="tradojax eval", description="evaluate a model on a task set")
    parser.add_argument("--data", help="a task file (overrides data.eval): .json/.jsonl/.parquet")
    parser.add_argument("--kind", choices=("math", "code"), help="task kind of --data (overrides data.kind)")
    parser.add_argument("--out", help="results JSON (default: eval.output or <workdir>/eval.json)")
    parser.add_argument("--responses", action="store_true", help="keep every response in the JSON")
    args = parser.parse_args(rest)
    if config_path is None:
        parser.error("--config=FILE is required")
    if args.data:
        overrides.append(f"data.eval={args.data}")
    if args.kind:
        overrides.append(f"data.kind={args.kind}")
    config = load_config(config_path, overrides)
    from tradojax.data.tasks import load_tasks
    from tradojax.data.tokenizer import tokenizer_from_name
    from tradojax.models.loading import load_policy
    from tradojax.rewards import RewardPool

    tasks = load_tasks(config.data, "eval")
    tokenizer = tokenizer_from_name(config.tokenizer)
    model = load_policy(config)
    with RewardPool(num_workers=config.rl.reward_workers) as pool:
        results = evaluate(model, tokenizer, tasks, config, pool=pool, keep_responses=args.responses, progress=True)
    print(format_table(results))
    out = Path(args.out or config.eval.output or Path(config.experiment.workdir) / "eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"config": config_path, "overrides": overrides, "data": config.data.eval,
                               "results": [r.summary() | ({"responses": r.responses} if args.responses else {})
                                           for r in results]}
    out.write_text(json.dumps(payload, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

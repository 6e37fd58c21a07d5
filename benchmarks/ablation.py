"""Miniature RL-method ablation (paper section 1.2a, at demo scale on CPU).

One SFT model (the demo's warm start: 70 steps of block SFT on the synthetic tasks), then, for each
seed, every method runs from that same checkpoint with the same rollout budget (steps x tasks x
responses per task) and the same task sequence (the task sampler and rollout rng follow the seed):

  * tracerl         TraceRL, rows follow the sampler's decoding order
  * tracerl_value   TraceRL with the diffusion value model (token-level GAE advantages)
  * coupled         a random mask and its complement per response
  * random_masking  one random mask per response

Reported per method (mean and std over seeds): held-out accuracy (avg@k on the held-out synthetic
tasks, the same sampling seed before and after RL), its change from the SFT start, the mean rollout
reward of the last quarter of steps, and the reward's step-to-step std (the std of the per-step
mean reward around its linear trend: the paper reports the value model reduces training variance).

    python benchmarks/ablation.py                  # 4 methods x 3 seeds (~40 min on 2 CPU cores)
    python benchmarks/ablation.py --seeds 0 --steps 4 --methods tracerl coupled   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tradojax.config import Config, apply_overrides, from_dict  # noqa: E402
from tradojax.demo import default_config  # noqa: E402

# method name -> rl overrides; the value model learns from a zero-initialised head, so it takes a
# larger learning rate than the policy.
METHODS = {
    "tracerl": dict(method="tracerl"),
    "tracerl_value": dict(method="tracerl", value_model=True, value_learning_rate=1e-3),
    "coupled": dict(method="coupled"),
    "random_masking": dict(method="random_masking"),
}
PAPER_ORDER = ["tracerl_value", "tracerl", "coupled", "random_masking"]  # paper section 1.2a, best first


def detrended_std(values: np.ndarray) -> float:
    """Std of `values` around their least-squares line (0 for fewer than 3 points)."""
    if len(values) < 3:
        return 0.0
    steps = np.arange(len(values), dtype=np.float64)
    slope, intercept = np.polyfit(steps, values, 1)
    return float(np.std(values - (slope * steps + intercept)))


def run(config: Config, methods: list[str], seeds: list[int], out: Path, log=print) -> dict:
    from tradojax.data.tasks import load_tasks
    from tradojax.data.tokenizer import tokenizer_from_name
    from tradojax.evaluation import evaluate
    from tradojax.models.loading import load_policy
    from tradojax.rewards import RewardPool
    from tradojax.rl.loop import RLTrainer
    from tradojax.sft.warm_start import warm_start

    tokenizer = tokenizer_from_name(config.tokenizer)
    train_tasks, held_out = load_tasks(config.data, "train"), load_tasks(config.data, "eval")
    started = time.perf_counter()
    sft_policy, _ = warm_start(config, load_policy(config), tokenizer, train_tasks, workdir=out / "sft", log=log)
    runs = []
    with RewardPool(num_workers=config.rl.reward_workers) as pool:
        sft_accuracy = {}
        for seed in seeds:
            result = evaluate(sft_policy, tokenizer, held_out, config, pool=pool, seed=seed)[0]
            sft_accuracy[seed] = result.accuracy
            log(f"seed {seed}: held-out accuracy after SFT {result.accuracy:.3f}")
    for seed in seeds:
        for method in methods:
            run_config = dataclasses.replace(
                config, experiment=dataclasses.replace(config.experiment, seed=seed),
                rl=dataclasses.replace(config.rl, eval_every=config.rl.steps, save_every=config.rl.steps,
                                       **METHODS[method]))
            run_start = time.perf_counter()
            # a fresh copy per run: the trainer's updates donate (consume) the arrays it starts from
            policy = nnx.merge(*_split_copy(sft_policy))
            trainer = RLTrainer(run_config, policy, tokenizer, workdir=out / f"{method}_seed{seed}",
                                train_tasks=train_tasks, eval_tasks=held_out, log=log)
            history = trainer.run()
            rewards = np.array([m["reward"] for m in history])
            accuracy = [v for k, v in history[-1].items() if k.startswith("eval/") and k.endswith("/accuracy")][0]
            quarter = max(1, len(rewards) // 4)
            record = {"method": method, "seed": seed, "held_out_accuracy": accuracy,
                      "accuracy_gain": accuracy - sft_accuracy[seed], "rewards": rewards.tolist(),
                      "reward_last_quarter": float(rewards[-quarter:].mean()),
                      "reward_first_quarter": float(rewards[:quarter].mean()),
                      "reward_step_std": detrended_std(rewards), "seconds": time.perf_counter() - run_start}
            if "value_explained_variance" in history[-1]:
                record["value_explained_variance"] = [m.get("value_explained_variance") for m in history]
            runs.append(record)
            log(f"{method:>15} seed {seed}: held-out {accuracy:.3f} ({record['accuracy_gain']:+.3f}), rollout reward "
                f"{record['reward_first_quarter']:.3f} -> {record['reward_last_quarter']:.3f}, step std "
                f"{record['reward_step_std']:.3f}, {record['seconds']:.0f}s")
    return {"sft_accuracy": {str(k): v for k, v in sft_accuracy.items()}, "runs": runs, "table": summarise(runs, methods),
            "rl_steps": config.rl.steps, "tasks_per_step": config.rl.num_tasks_per_step,
            "responses_per_task": config.rl.num_responses_per_task, "held_out_tasks": len(held_out),
            "samples_per_task": config.eval.num_samples, "seconds": time.perf_counter() - started}


def _split_copy(model):
    graphdef, params = nnx.split(model)
    return graphdef, jax.tree.map(jnp.copy, params)


def summarise(runs: list[dict], methods: list[str]) -> list[dict]:
    table = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        row = {"method": method, "seeds": len(mine)}
        for key in ("held_out_accuracy", "accuracy_gain", "reward_last_quarter", "reward_step_std"):
            values = np.array([r[key] for r in mine])
            row[key] = float(values.mean())
            row[key + "_std"] = float(values.std())
        table.append(row)
    return table


def format_table(result: dict) -> str:
    lines = [f"{'method':<16}{'held-out acc':>16}{'gain vs SFT':>16}{'reward (last 1/4)':>20}{'reward step std':>18}"
             f"{'paper rank':>12}"]
    for row in result["table"]:
        rank = PAPER_ORDER.index(row["method"]) + 1
        lines.append(f"{row['method']:<16}{row['held_out_accuracy']:>9.3f} ±{row['held_out_accuracy_std']:.3f}"
                     f"{row['accuracy_gain']:>+9.3f} ±{row['accuracy_gain_std']:.3f}"
                     f"{row['reward_last_quarter']:>13.3f} ±{row['reward_last_quarter_std']:.3f}"
                     f"{row['reward_step_std']:>11.3f} ±{row['reward_step_std_std']:.3f}{rank:>12}")
    sft = np.array(list(result["sft_accuracy"].values()))
    lines.append(f"SFT start: held-out acc {sft.mean():.3f} ±{sft.std():.3f}; {result['rl_steps']} RL steps x "
                 f"{result['tasks_per_step']} tasks x {result['responses_per_task']} responses; "
                 f"{result['held_out_tasks']} held-out tasks x {result['samples_per_task']} samples; ± = std over seeds")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, help="RL steps per run (default: the demo's)")
    parser.add_argument("--out", default="runs/ablation", help="run directories and ablation.json")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. rl.num_tasks_per_step=8")
    args = parser.parse_args(argv)
    config_dict = default_config()
    apply_overrides(config_dict, args.overrides + ([f"rl.steps={args.steps}"] if args.steps else []))
    config = from_dict(Config, config_dict)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(config, args.methods, args.seeds, out, log=lambda line: print(line, flush=True))
    (out / "ablation.json").write_text(json.dumps(result, indent=2))
    print()
    print(format_table(result))
    print(f"\n{result['seconds'] / 60:.1f} min; per-run records in {out / 'ablation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

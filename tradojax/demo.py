"""`tradojax demo`: the whole pipeline on a laptop CPU, from nothing, in minutes.

1. build a small BPE tokenizer and a family of synthetic arithmetic tasks with exact answers
   (disjoint train / held-out splits);
2. SFT a small block-diffusion model (block SFT, all blocks in one pass) on worked solutions;
3. measure held-out accuracy with the cached block-diffusion sampler and the math verifier;
4. run TraceRL from the SFT model (rollouts, verified rewards, trace rows, PPO updates);
5. measure held-out accuracy again, on the same tasks with the same sampling seed;
6. write: metrics.json, curves.png (SFT loss, RL reward, held-out accuracy), trace.html (one
   answer's decode order, replayable) and hf/ (the model in Hugging Face SDAR form).

`--config.model.family=llada` (or `dream`) runs the same pipeline on a full-attention model: its
SFT, the full-attention sampler and TraceRL with shrinkage (`full_attention_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import ml_collections

from tradojax.config import Config, ConfigError, apply_overrides, from_dict


def default_config() -> ml_collections.ConfigDict:
    """The demo's built-in settings (also `configs/demo.py`)."""
    config = ml_collections.ConfigDict()
    config.experiment = dict(name="demo", workdir="runs/demo", seed=0)
    config.model = dict(family="sdar", vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4,
                        num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=256, block_size=4,
                        mask_token_id=3, eos_token_id=0, pad_token_id=0)
    config.tokenizer = "tiny"
    config.sampling = dict(block_size=4, denoising_steps=4, max_new_tokens=32, prompt_buckets=[48, 64],
                           remasking_strategy="low_confidence_dynamic", dynamic_threshold=0.9,
                           stop_token_ids=[2])  # <|im_end|> ends an answer
    # structural tasks (largest of 4 digits, 4 digits reversed): the rule generalises to held-out
    # operands. A short SFT leaves the sampled (temperature 1) answers right about 40% of the time
    # while greedy is right far more often: the room that RL on verified rewards can take.
    config.data = dict(train="synthetic", eval="synthetic", kind="math", synthetic_train_size=1500,
                       synthetic_eval_size=64, synthetic_difficulty=2, synthetic_kinds=["maximum", "reverse"],
                       seed=0)
    # SFT first (the RL start), then RL updates with their own smaller, constant learning rate.
    config.warm_start = dict(steps=70, batch_size=64, learning_rate=2e-3, schedule="cosine", warmup_steps=20,
                             min_lr_ratio=0.1, block_size=4, max_prompt_len=64, max_response_len=32)
    config.train = dict(batch_size=64, learning_rate=1e-4, schedule="constant", block_size=4, max_prompt_len=64,
                        max_response_len=32)
    config.rl = dict(method="tracerl", steps=20, num_tasks_per_step=16, num_responses_per_task=8,
                     difficulty_lower=0.1, difficulty_upper=0.9, eval_every=5, save_every=5, beta=0.01,
                     reward_workers=1)
    config.eval = dict(strategies=["low_confidence_dynamic"], top_k=[0], num_samples=4)
    return config


FULL_ATTENTION_FAMILIES = ("llada", "dream")  # sampling/full_diffusion.py's (not imported: no jax here)


def full_attention_config(family: str) -> ml_collections.ConfigDict:
    """The demo for a full-attention family (`--config.model.family=llada` or `dream`): the same
    tasks, sizes and RL steps; a longer random-masking SFT; the family's architecture (no qk-norm;
    LLaDA multi-head, Dream q/k/v biases), its loss rule (each row divided by its trained-token
    count, spec 3.10) and TraceRL with the paper's shrinkage s = 8 over the whole response (one
    row per 8 denoising steps)."""
    config = default_config()
    config.model.update(family=family, qk_norm=False)
    if family == "llada":
        config.model.num_kv_heads = config.model.num_heads
    else:
        config.model.qkv_bias = True
    config.train.loss_normalization = "tokens"
    config.rl.shrink = 8
    # Full attention learns where it is in the answer from relative positions only: 70 steps leave
    # its samples garbled (held-out accuracy ~0.02). Random-masking SFT (all of a response's tokens
    # per row) for longer gets it to ~0.35 sampled.
    config.warm_start.steps = 250
    canvas = config.sampling.max_new_tokens
    config.sft = dict(mode="random_masking", buckets="multiple", bucket_multiple=canvas, min_bucket=canvas)
    # Rows as long as the sampler's canvas (32: every position the sampler decodes has been seen
    # masked), and the first 8 pads after an answer trained (SFT and RL): the model learns to
    # write an all-pad block after <|im_end|>, which ends the row instead of decoding the rest of
    # the canvas.
    config.warm_start.post_num = 8
    config.train.post_num = 8
    return config


def run_demo(config: Config, out: Path, *, log=print, tokenizer=None) -> dict:
    """The whole demo (module docstring); `tokenizer` defaults to the config's."""
    # The pipeline is imported here, not at the top: configs/demo.py and configs/rl_tiny.py import
    # `default_config` from this module, and loading a config must stay light (no jax).
    from tradojax.bootstrap import load_tokenizer
    from tradojax.data.tasks import load_tasks
    from tradojax.evaluation import evaluate
    from tradojax.models.loading import load_policy
    from tradojax.rewards import RewardPool
    from tradojax.rl.loop import RLTrainer
    from tradojax.sft.warm_start import warm_start

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if tokenizer is None:
        tokenizer, _ = load_tokenizer(config)
    train_tasks, held_out = load_tasks(config.data, "train"), load_tasks(config.data, "eval")
    log(f"[1/5] tokenizer ({len(tokenizer)} tokens), {len(train_tasks)} train and {len(held_out)} held-out "
        f"synthetic tasks (difficulty {config.data.synthetic_difficulty}), e.g. {held_out[0].question!r}")

    if config.warm_start is None:
        raise ConfigError("warm_start: the demo starts RL from an SFT model; the config needs a warm_start section")
    kind = "block-diffusion" if config.model.family not in FULL_ATTENTION_FAMILIES else config.model.family
    log(f"[2/5] SFT: {config.model.num_params() / 1e6:.2f}M-parameter {kind} model, "
        f"{config.warm_start.steps} steps of {config.warm_start.batch_size} rows")
    sft_policy, sft_history = warm_start(
        config, load_policy(config), tokenizer, train_tasks, workdir=out / "sft", log=lambda line: log("      " + line))

    with RewardPool(num_workers=config.rl.reward_workers) as pool:
        before = evaluate(sft_policy, tokenizer, held_out, config, pool=pool, seed=config.experiment.seed)[0]
    log(f"[3/5] held-out accuracy after SFT: {before.accuracy:.3f} (avg@{before.num_samples}), "
        f"pass@{before.num_samples} {before.pass_at_k:.3f}")

    log(f"[4/5] TraceRL: {config.rl.steps} steps x {config.rl.num_tasks_per_step} tasks x "
        f"{config.rl.num_responses_per_task} responses")
    trainer = RLTrainer(config, sft_policy, tokenizer, workdir=out / "rl", train_tasks=train_tasks,
                        eval_tasks=held_out)

    def show(m):
        log(f"      rl step {m['step']:>3}  reward {m['reward']:.3f}  kept groups {m.get('kept_groups', 0):>2}  "
            f"kl {m.get('kl', 0):.4f}  tokens/step {m['tokens_per_step']:.2f}  {m['step_s']:.1f}s")

    rl_history = trainer.run(on_step=show)
    final = trainer.sampler_model()
    with RewardPool(num_workers=config.rl.reward_workers) as pool:
        after = evaluate(final, tokenizer, held_out, config, pool=pool, seed=config.experiment.seed, keep_responses=True)[0]
    log(f"[5/5] held-out accuracy after TraceRL: {after.accuracy:.3f} (avg@{after.num_samples}), "
        f"pass@{after.num_samples} {after.pass_at_k:.3f}")

    artefacts = _write_artefacts(out, config, tokenizer, final, held_out, sft_history, rl_history, before, after)
    summary = {
        "accuracy_after_sft": before.accuracy, "accuracy_after_rl": after.accuracy,
        "pass_at_k_after_sft": before.pass_at_k, "pass_at_k_after_rl": after.pass_at_k,
        "mean_length_after_sft": before.mean_length, "mean_length_after_rl": after.mean_length,
        "held_out_tasks": len(held_out), "samples_per_task": after.num_samples,
        "sft_steps": config.warm_start.steps, "rl_steps": config.rl.steps, "seconds": time.perf_counter() - started,
    }
    (out / "metrics.json").write_text(json.dumps(
        {"summary": summary, "sft": sft_history, "rl": rl_history,
         "eval_after_sft": before.summary(), "eval_after_rl": after.summary()}, indent=2))
    table = demo_table(summary, rl_history)
    (out / "summary.json").write_text(json.dumps(table, indent=2) + "\n")
    log("")
    log(f"{'':<22}{'after SFT':>12}{'after TraceRL':>15}")
    log(f"{'held-out accuracy':<22}{before.accuracy:>12.3f}{after.accuracy:>15.3f}")
    log(f"{'held-out pass@' + str(after.num_samples):<22}{before.pass_at_k:>12.3f}{after.pass_at_k:>15.3f}")
    log(f"{'mean answer length':<22}{before.mean_length:>12.1f}{after.mean_length:>15.1f}")
    log("")
    log(f"done in {summary['seconds'] / 60:.1f} min: " + ", ".join(str(p) for p in [out / "metrics.json", *artefacts]))
    return summary


def demo_table(summary: dict, rl_history: list[dict]) -> dict:
    """The figures the README quotes from a demo run, rounded as printed: `summary.json` of a run and
    `benchmarks/results/demo.json` (the recorded run) share this form, so `python
    benchmarks/demo_figures.py` can compare a fresh run with the README."""
    evals = {str(m["step"]): round(v, 3) for m in rl_history for k, v in m.items()
             if k.startswith("eval/") and k.endswith("/accuracy")}
    return {
        "accuracy": [round(summary["accuracy_after_sft"], 3), round(summary["accuracy_after_rl"], 3)],
        "pass_at_k": [round(summary["pass_at_k_after_sft"], 3), round(summary["pass_at_k_after_rl"], 3)],
        "mean_length": [round(summary["mean_length_after_sft"], 1), round(summary["mean_length_after_rl"], 1)],
        "held_out_accuracy_at_rl_step": evals,
        "rollout_reward": [round(m["reward"], 3) for m in rl_history],
        "samples_per_task": summary["samples_per_task"], "held_out_tasks": summary["held_out_tasks"],
        "sft_steps": summary["sft_steps"], "rl_steps": summary["rl_steps"],
    }


def _write_artefacts(out, config, tokenizer, model, held_out, sft_history, rl_history, before, after):
    # imported here for the reason given in run_demo
    from tradojax.data.templates import math_prompt
    from tradojax.models.hf import save_hf_model
    from tradojax.sampling.full_diffusion import sampler_for
    from tradojax.sampling.trace_view import token_pieces, write_trace_page

    paths = []
    # curves
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([m["step"] for m in sft_history], [m["loss"] for m in sft_history])
    axes[0].set(title="SFT loss", xlabel="step")
    axes[1].plot([m["step"] for m in rl_history], [m["reward"] for m in rl_history], marker="o")
    axes[1].set(title="TraceRL mean reward (rollouts)", xlabel="RL step")
    axes[1].xaxis.get_major_locator().set_params(integer=True)
    evals = [(m["step"], v) for m in rl_history for k, v in m.items() if k.startswith("eval/") and k.endswith("/accuracy")]
    axes[2].plot([0] + [s for s, _ in evals], [before.accuracy] + [v for _, v in evals], marker="o")
    axes[2].set(title="held-out accuracy", xlabel="RL step (0 = after SFT)", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    paths.append(out / "curves.png")

    # one answer's decode trace
    task = held_out[0]
    sampling = dataclasses.replace(config.sampling, num_samples=1)
    prompt = math_prompt(tokenizer, task.question)
    rollout = sampler_for(model, sampling).generate([list(prompt.token_ids)], rng=7).to_numpy()
    n = int(rollout.lengths[0])
    ids = rollout.tokens[0, :n].tolist()
    pieces, special = token_pieces(tokenizer, ids)
    write_trace_page(out / "trace.html", pieces, rollout.trace[0, :n].tolist(), special,
                     title=f"tradojax demo: {task.question}", prompt=prompt.text,
                     meta={"block size": sampling.block_size, "strategy": sampling.remasking_strategy,
                           "answer": task.ground_truth_answer})
    paths.append(out / "trace.html")

    # Hugging Face export
    save_hf_model(model, out / "hf", tokenizer=tokenizer, overwrite=True)
    paths.append(out / "hf")
    return paths


def main(argv: list[str]) -> int:
    from tradojax.bootstrap import bootstrap  # imported here for the reason given in run_demo

    parser = argparse.ArgumentParser(prog="tradojax demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")

    def built_in(overrides: list[str]) -> Config:  # no --config: the demo's own settings
        config_dict = default_config()
        apply_overrides(config_dict, overrides)
        if config_dict.model.family in FULL_ATTENTION_FAMILIES:  # that family's settings, then the overrides
            config_dict = full_attention_config(config_dict.model.family)
            apply_overrides(config_dict, overrides)
        return from_dict(Config, config_dict)

    setup = bootstrap(argv, parser, default_config=built_in, mesh=False)  # the demo runs on one device
    run_demo(setup.config, Path(setup.args.out), tokenizer=setup.tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`tradojax rl --config FILE [--config.a.b=v ...] [--resume] [--workdir DIR] [--export-hf DIR]`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from flax import nnx

from tradojax.bootstrap import CommandError, bootstrap, check_tokenizer_matches
from tradojax.checkpoint import Preempted
from tradojax.data.tasks import load_tasks
from tradojax.models.loading import export_model, load_policy
from tradojax.rl.loop import RLTrainer
from tradojax.sft.warm_start import warm_start
from tradojax.training.run_loop import live_progress


def rl_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tradojax rl", description="RL (TraceRL, random masking, coupled)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the workdir")
    parser.add_argument("--workdir", help="run directory (default: experiment.workdir)")
    parser.add_argument("--export-hf", metavar="DIR",
                        help="write the final policy (and value model, in DIR/value/) in Hugging Face form")

    def check(args: argparse.Namespace, overrides: list[str]) -> None:
        if args.export_hf and Path(args.export_hf).exists() and any(Path(args.export_hf).iterdir()):
            # checked now, not after hours of training
            raise CommandError(f"--export-hf {args.export_hf}: directory exists and is not empty")

    # the config, the multi-host join (before any device use), the tokenizer (refused before any
    # work when missing, garbled or without mask/EOS tokens) and the mesh
    setup = bootstrap(argv, parser, check=check)
    config, args, tokenizer, mesh = setup.config, setup.args, setup.tokenizer, setup.mesh
    workdir = Path(args.workdir or config.experiment.workdir)
    train_tasks = load_tasks(config.data, "train")
    policy = load_policy(config, mesh=mesh)
    check_tokenizer_matches(policy.config, tokenizer, setup.special_ids)
    if config.warm_start is not None:
        print(f"warm start: {config.warm_start.steps} SFT steps before RL (in {workdir / 'warm_start'})", flush=True)
        try:
            policy, _ = warm_start(config, policy, tokenizer, train_tasks, workdir=workdir / "warm_start",
                                   resume=args.resume, mesh=mesh, log=lambda line: print(line, flush=True))
        except Preempted as stop:
            print(stop)
            return 0
    if policy.config != config.model:  # e.g. a Hugging Face checkpoint: its own config.json wins
        print(f"rl: using the policy's model config (family {policy.config.family!r}) instead of config.model")
        config = dataclasses.replace(config, model=policy.config)  # so the run's steps record it
    trainer = RLTrainer(config, policy, tokenizer, workdir=workdir, train_tasks=train_tasks,
                        eval_tasks=load_tasks(config.data, "eval"), mesh=mesh)

    keys = ("step", "reward", "accuracy", "response_length", "tokens_per_step", "kl", "clip_fraction",
            "entropy", "sampler_trainer_logp_gap", "value_loss", "step_s")
    # A live bar on stderr (a terminal only); one JSON line per step on stdout, for logs and scripts.
    with live_progress(config.rl.method, config.rl.steps, keys=keys,
                       headline=lambda metrics: f"reward {metrics['reward']:.3f}") as progress:
        try:
            trainer.run(resume=args.resume, on_step=progress.on_step, on_phase=progress.on_phase)
        except Preempted as stop:
            print(stop)
            return 0
    print(f"done: {config.rl.steps} steps; metrics in {workdir}/metrics.jsonl, checkpoints in {workdir}/checkpoints")
    if args.export_hf:
        value = nnx.merge(trainer.value_graphdef, trainer.value_params) if config.rl.value_model else None
        out = export_model(trainer.sampler_model(), args.export_hf, value=value, tokenizer=tokenizer)
        print(f"exported the policy in Hugging Face form to {out}"
              + (f" (value model in {out}/value)" if value is not None else ""))
    return 0

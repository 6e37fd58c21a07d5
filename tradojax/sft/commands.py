"""`tradojax sft --config FILE (--data FILE | --synthetic N) [--config.sft.mode=M] [--config.a.b=v ...]`.

Fine-tunes the config's policy (`hf_checkpoint`, else a random init) with block, trace, semi-AR
or random-masking SFT; checkpoints, metrics (`sft_metrics.jsonl`, TensorBoard) and resume as in
`tradojax rl`. The SFT options are the config's `sft` section (`SFTConfig`); `--mode`,
`--shrink`, ... are short forms of `--config.sft.mode`, ... Block-size adaptation:
`--config.train.block_size=8 --config.sft.eval_block_sizes=[4,8]`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tradojax.bootstrap import CommandError, Setup, bootstrap, check_tokenizer_matches, one_device_or_mesh
from tradojax.config import SFTConfig
from tradojax.data.readers import DataFormatError
from tradojax.data.tasks import load_tasks
from tradojax.models.loading import export_model, load_policy
from tradojax.sft.config import MODES
from tradojax.sft.data import load_sft_pairs, synthetic_pair, synthetic_sft_pairs
from tradojax.sft.trainer import Preempted, SFTTrainer
from tradojax.training.run_loop import live_progress

# The short flags: each sets one field of the config's `sft` section (flag dest -> field).
SFT_FLAGS = {"mode": "mode", "save_every": "save_every", "eval_every": "eval_every",
             "eval_block_sizes": "eval_block_sizes", "shrink": "shrink", "mask_times": "mask_times_per_sample",
             "buckets": "buckets", "min_bucket": "min_bucket", "bucket_multiple": "bucket_multiple"}


def _block_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block sizes such as 4,8, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"block sizes must be >= 1, got {text!r}")
    return sizes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tradojax sft", description="SFT: block, trace, semi-AR, random masking")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", help="SFT records {prompt, response[, step_map]} (.json/.jsonl/.parquet)")
    source.add_argument("--synthetic", type=int, metavar="N",
                        help="N built-in synthetic math tasks with their worked solutions")
    parser.add_argument("--mode", choices=MODES,
                        help="sft.mode: row construction (default: block for sdar, random_masking for llada, "
                             "semi_ar for dream)")
    parser.add_argument("--held-out", type=int, default=0, metavar="K",
                        help="K examples kept out of training for a held-out loss at each eval")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the workdir")
    parser.add_argument("--workdir", help="run directory (default: experiment.workdir)")
    parser.add_argument("--save-every", type=int, help="sft.save_every: steps between checkpoints (0: only at the end)")
    parser.add_argument("--eval-every", type=int, help="sft.eval_every: steps between evals (0: none)")
    parser.add_argument("--eval-block-sizes", type=_block_sizes,
                        help="sft.eval_block_sizes: sampling block sizes to evaluate at, e.g. 4,8 "
                             "(default: sampling.block_size)")
    parser.add_argument("--shrink", type=int, help="sft.shrink: trace SFT merges groups of this many decoding steps")
    parser.add_argument("--mask-times", type=int, help="sft.mask_times_per_sample: random_masking rows per example")
    parser.add_argument("--buckets", choices=("pow2", "multiple", "single"),
                        help=f"sft.buckets: length buckets (default {SFTConfig.buckets})")
    parser.add_argument("--min-bucket", type=int, help=f"sft.min_bucket: smallest pow2 bucket (default {SFTConfig.min_bucket})")
    parser.add_argument("--bucket-multiple", type=int,
                        help=f"sft.bucket_multiple: bucket step for --buckets multiple (default {SFTConfig.bucket_multiple})")
    parser.add_argument("--export-hf", metavar="DIR", help="write the trained model in Hugging Face form at the end")
    return parser


def sft_main(argv: list[str]) -> int:
    """Runs SFT; bad input raises a user error (`tradojax.bootstrap.run_command`: exit code 2 and a
    message naming the file/record/field)."""
    parser = _parser()

    def check(args: argparse.Namespace, overrides: list[str]) -> None:
        if args.data is None and args.synthetic is None:
            parser.error("give the training data: --data FILE or --synthetic N")
        if args.synthetic is not None and args.synthetic < 1:
            parser.error(f"--synthetic: must be >= 1, got {args.synthetic}")
        if args.held_out < 0:
            parser.error(f"--held-out: must be >= 0, got {args.held_out}")
        if args.export_hf and Path(args.export_hf).exists() and any(Path(args.export_hf).iterdir()):
            # checked now, not after hours of training
            raise CommandError(f"--export-hf {args.export_hf}: directory exists and is not empty")
        for dest, field in SFT_FLAGS.items():  # a short flag is the override it stands for (given last: it wins)
            value = getattr(args, dest)
            if value is not None:
                overrides.append(f"sft.{field}={value!r}")

    # the config, the multi-host join, the tokenizer (refused without mask/EOS tokens) and the mesh
    setup = bootstrap(argv, parser, check=check)
    sft = setup.config.sft.for_family(setup.config.model.family)  # a mode that does not fit: refused before any work
    return _run(setup, sft)


def _run(setup: Setup, sft: SFTConfig) -> int:
    config, args, tokenizer = setup.config, setup.args, setup.tokenizer
    eval_tasks = []
    if args.synthetic is not None:
        pairs, eval_tasks = synthetic_sft_pairs(args.synthetic, config, tokenizer)
        held_out = [synthetic_pair(task, config, tokenizer) for task in eval_tasks[: args.held_out]]
    else:
        pairs = load_sft_pairs(args.data, tokenizer, vocab_size=config.model.vocab_size)
        if args.held_out >= len(pairs):
            raise DataFormatError(f"--held-out {args.held_out} leaves no training example of {len(pairs)}",
                                  file=args.data)
        order = np.random.default_rng([config.experiment.seed, 0x4E1D]).permutation(len(pairs))
        held_out = [pairs[i] for i in sorted(order[: args.held_out])]
        held = set(order[: args.held_out].tolist())
        pairs = [p for i, p in enumerate(pairs) if i not in held]
        if sft.eval_every and config.model.family == "sdar":
            eval_tasks = load_tasks(config.data, "eval")
    if not sft.eval_every:
        eval_tasks = []

    mesh = one_device_or_mesh(setup.mesh)  # one device: the unsharded path
    workdir = args.workdir or config.experiment.workdir
    policy = load_policy(config, mesh=mesh)
    check_tokenizer_matches(policy.config, tokenizer, setup.special_ids)
    # the config's sft section: "auto" resolves by the loaded policy's family (a checkpoint's own config wins)
    trainer = SFTTrainer(config, policy, pairs, workdir=workdir, held_out=held_out, sft=config.sft,
                         mesh=mesh, tokenizer=tokenizer, eval_tasks=eval_tasks)
    print(f"SFT ({trainer.mode}, {trainer.family}): {len(trainer.pairs)} examples, "
          f"{sum(trainer.plan.row_counts)} rows, {trainer.plan.batches_per_epoch} batches per epoch, "
          f"{config.train.steps} steps of {config.train.batch_size} rows", flush=True)

    keys = ("step", "epoch", "loss", "nll_per_token", "grad_norm", "rows", "bucket", "held_out_loss", "step_s")
    with live_progress(f"sft {trainer.mode}", config.train.steps, keys=keys,
                       headline=lambda record: f"loss {record['loss']:.3f}") as progress:
        try:
            trainer.run(resume=args.resume, save_every=sft.save_every or config.train.steps,
                        on_step=progress.on_step)
        except Preempted as stop:
            print(stop)
            return 0
    print(f"done: {config.train.steps} steps; metrics in {workdir}/sft_metrics.jsonl, "
          f"checkpoints in {trainer.checkpointer.directory}")
    if args.export_hf:
        out = export_model(trainer.policy(), args.export_hf, tokenizer=tokenizer)
        print(f"exported the model in Hugging Face form to {out}")
    return 0

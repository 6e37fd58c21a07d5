"""`tradojax sft --config FILE (--data FILE | --synthetic N) [--mode M] [--config.a.b=v ...]`.

Fine-tunes the config's policy (`hf_checkpoint`, else a random init) with block, trace, semi-AR
or random-masking SFT; checkpoints, metrics (`sft_metrics.jsonl`, TensorBoard) and resume as in
`tradojax rl`. Block-size adaptation: `--config.train.block_size=8 --eval-block-sizes 4,8`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tradojax.config import load_config, split_config_args
from tradojax.sft.config import MODES, SFTConfig

# The original's defaults: sft_trado/sft_sdar "semi-ar" (our block SFT), sft_llada random
# masking (m = 1), sft_dream semi-ar (sliced).
DEFAULT_MODES = {"sdar": "block", "llada": "random_masking", "dream": "semi_ar"}


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
                        help="row construction (default: block for sdar, random_masking for llada, semi_ar for dream)")
    parser.add_argument("--held-out", type=int, default=0, metavar="K",
                        help="K examples kept out of training for a held-out loss at each eval")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the workdir")
    parser.add_argument("--workdir", help="run directory (default: experiment.workdir)")
    parser.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    parser.add_argument("--eval-every", type=int, default=0, help="steps between evals (0: none)")
    parser.add_argument("--eval-block-sizes", type=_block_sizes, default=(),
                        help="sampling block sizes to evaluate at, e.g. 4,8 (default: sampling.block_size)")
    parser.add_argument("--shrink", type=int, default=1, help="trace SFT: merge groups of this many decoding steps")
    parser.add_argument("--mask-times", type=int, default=1, help="random_masking: rows per example")
    parser.add_argument("--buckets", choices=("pow2", "multiple", "single"), default="pow2",
                        help="length buckets (default pow2)")
    parser.add_argument("--min-bucket", type=int, default=SFTConfig.min_bucket, help="smallest pow2 bucket")
    parser.add_argument("--bucket-multiple", type=int, default=SFTConfig.bucket_multiple,
                        help="bucket step for --buckets multiple")
    parser.add_argument("--export-hf", metavar="DIR", help="write the trained model in Hugging Face form at the end")
    return parser


def sft_main(argv: list[str]) -> int:
    """Runs SFT; returns 0, or 2 with a message naming the file/record/field for bad input."""
    from tradojax.checkpoint import CheckpointError
    from tradojax.data.readers import DataFormatError
    from tradojax.data.tokenizer import TokenizerError

    config_path, overrides, rest = split_config_args(argv)
    parser = _parser()
    args = parser.parse_args(rest)
    if config_path is None:
        parser.error("--config=FILE is required")
    if args.data is None and args.synthetic is None:
        parser.error("give the training data: --data FILE or --synthetic N")
    if args.synthetic is not None and args.synthetic < 1:
        parser.error(f"--synthetic: must be >= 1, got {args.synthetic}")
    if args.held_out < 0:
        parser.error(f"--held-out: must be >= 0, got {args.held_out}")
    if args.export_hf and Path(args.export_hf).exists() and any(Path(args.export_hf).iterdir()):
        # checked now, not after hours of training
        sys.stderr.write(f"tradojax sft: --export-hf {args.export_hf}: directory exists and is not empty\n")
        return 2
    config = load_config(config_path, overrides)
    sft = SFTConfig(mode=args.mode or DEFAULT_MODES[config.model.family],
                    shrink=args.shrink, mask_times_per_sample=args.mask_times, buckets=args.buckets,
                    min_bucket=args.min_bucket, bucket_multiple=args.bucket_multiple, save_every=args.save_every,
                    eval_every=args.eval_every, eval_block_sizes=args.eval_block_sizes)
    sft.check_family(config.model.family)
    try:
        return _run(config, sft, args)
    except (DataFormatError, TokenizerError) as err:
        sys.stderr.write(f"tradojax sft: data error: {err}\n")
        return 2
    except CheckpointError as err:
        sys.stderr.write(f"tradojax sft: checkpoint error: {err}\n")
        return 2


def _run(config, sft: SFTConfig, args) -> int:
    import numpy as np

    from tradojax.data.readers import DataFormatError
    from tradojax.data.tokenizer import special_token_ids, tokenizer_from_name
    from tradojax.models.loading import load_policy
    from tradojax.sampling.commands import check_tokenizer_matches
    from tradojax.parallel.mesh import make_mesh
    from tradojax.sft.data import load_sft_pairs, synthetic_pair, synthetic_sft_pairs
    from tradojax.sft.trainer import Preempted, SFTTrainer

    tokenizer = tokenizer_from_name(config.tokenizer)
    special_ids = special_token_ids(tokenizer)  # a tokenizer without mask/EOS tokens: TokenizerError
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
            from tradojax.data.tasks import load_tasks

            eval_tasks = load_tasks(config.data, "eval")
    if not sft.eval_every:
        eval_tasks = []

    mesh = make_mesh(config.mesh)
    if mesh.size == 1:
        mesh = None
    workdir = args.workdir or config.experiment.workdir
    policy = load_policy(config, mesh=mesh)
    check_tokenizer_matches(policy.config, tokenizer, special_ids)
    trainer = SFTTrainer(config, policy, pairs, workdir=workdir, held_out=held_out, sft=sft,
                         mesh=mesh, tokenizer=tokenizer, eval_tasks=eval_tasks)
    print(f"SFT ({sft.mode}, {config.model.family}): {len(trainer.pairs)} examples, "
          f"{sum(trainer.plan.row_counts)} rows, {trainer.plan.batches_per_epoch} batches per epoch, "
          f"{config.train.steps} steps of {config.train.batch_size} rows", flush=True)

    def show(record: dict) -> None:
        keys = ("step", "epoch", "loss", "nll_per_token", "grad_norm", "rows", "bucket", "held_out_loss", "step_s")
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()
                 if k in keys or k.endswith("/accuracy")}
        print(json.dumps(shown), flush=True)

    try:
        trainer.run(resume=args.resume, save_every=sft.save_every or config.train.steps, on_step=show)
    except Preempted as stop:
        print(stop)
        return 0
    print(f"done: {config.train.steps} steps; metrics in {workdir}/sft_metrics.jsonl, "
          f"checkpoints in {trainer.checkpointer.directory}")
    if args.export_hf:
        from tradojax.models.loading import export_model

        out = export_model(trainer.policy(), args.export_hf, tokenizer=tokenizer)
        print(f"exported the model in Hugging Face form to {out}")
    return 0

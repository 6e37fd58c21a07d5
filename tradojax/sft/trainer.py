"""SFT (spec section 5): rows from (prompt ids, response ids) pairs, batched by length bucket.

Block-diffusion (sdar) models train on `[prompt | clean | noisy]` rows under the block mask:
`block` SFT (the original's `semi-ar`, the default) masks every response position with
probability p_j ~ U(lower_p, upper_p) and trains all blocks at once; `trace` SFT builds rows from a
recorded decode trace exactly as TraceRL does. Full-attention models (llada, dream) train on
single-stream `[prompt | noisy response]` rows (`semi_ar`, `random_masking`, `trace`; training/row_masks.py).

Block-size adaptation (the paper's: a block-4 model learns to decode at block 8) is block or trace
SFT with `train.block_size` set to the new size; the trained model reports that size as its native
one (`policy()`), and `evaluate_sampling` samples at any list of block sizes.

Training state (params, optimizer, step, history) is checkpointed with orbax and resumes exactly:
which rows make up update `step`, and their random masks, are pure functions of (seed, step).
Parameters and row batches are sharded on a mesh when one is given (the `train` role rules).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from tradojax.config import Config, TrainConfig, to_dict
from tradojax.evaluation import evaluate
from tradojax.models.transformer import Decoder
from tradojax.ops.masks import BlockAlignment
from tradojax.rewards import RewardPool
from tradojax.sft.batches import BatchPlan, PlannedBatch, assign_buckets
from tradojax.sft.config import SFTConfig
from tradojax.training.row_masks import (full_trace_masks, random_mask, random_masking_masks, semi_ar_masks,
                                        trace_rounds)
from tradojax.training.rows import RowLayout, Rows, pack_rows, round_up
from tradojax.training.run_loop import Preempted, RunLoop, check_batch_fits_mesh, compiled_update, eval_metrics
from tradojax.training.step import make_optimizer, make_schedule, make_train_step, pin_layouts, sft_loss

_MASK_SALT = 0x5F7  # keeps SFT mask streams apart from other seeded streams
_HELD_OUT_SEED = 0  # held-out masks are fixed: the held-out loss is comparable across steps


@dataclasses.dataclass(frozen=True)
class SFTPair:
    """Token ids of one SFT example; `trace` (1-based steps per response token) for trace SFT."""

    prompt: tuple[int, ...]
    response: tuple[int, ...]
    trace: tuple[int, ...] | None = None


def lengths_for(pairs: Sequence[SFTPair], config: Config) -> tuple[int, int]:
    """(L0, L1): the longest prompt and response, rounded up to a multiple of 8 / the block."""
    train = config.train
    longest_prompt = max(len(p.prompt) for p in pairs)
    longest_response = max(len(p.response) for p in pairs)
    if longest_prompt > train.max_prompt_len:
        raise ValueError(f"a prompt of {longest_prompt} tokens exceeds train.max_prompt_len={train.max_prompt_len}")
    if longest_response > train.max_response_len:
        raise ValueError(f"a response of {longest_response} tokens exceeds train.max_response_len="
                         f"{train.max_response_len}")
    return round_up(longest_prompt, 8), round_up(longest_response, train.block_size)


def example_masks(pair: SFTPair, config: Config, *, mode: str, response_length: int, rng: np.random.Generator,
                  shrink: int = 1, mask_times_per_sample: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (noisy, trained) masks, each [response_length] bool, of every row of one example."""
    train, family = config.train, config.model.family
    n = len(pair.response)
    trace = None if pair.trace is None else np.asarray(pair.trace, np.int64)
    if family == "sdar":
        if mode == "block":
            return [random_mask(n, response_length, lower_p=train.lower_p, upper_p=train.upper_p,
                                post_num=train.post_num, rng=rng)]
        if mode == "trace":
            rounds = trace_rounds(np.arange(1, n + 1) if trace is None else trace, n,
                                  response_length=response_length, prompt_length=len(pair.prompt),
                                  block_size=train.block_size, shrink=shrink, post_num=train.post_num,
                                  alignment=BlockAlignment(train.block_alignment))
            return [(r.noisy, r.trained) for r in rounds]
    else:
        if mode == "semi_ar":
            return semi_ar_masks(n, response_length, block_size=train.block_size, lower_p=train.lower_p,
                                 upper_p=train.upper_p, post_num=train.post_num, rng=rng, trace=trace)
        if mode == "random_masking":
            return random_masking_masks(n, response_length, times=mask_times_per_sample, lower_p=train.lower_p,
                                        upper_p=train.upper_p, post_num=train.post_num, rng=rng)
        if mode == "trace":
            return full_trace_masks(trace, n, response_length, shrink=shrink, post_num=train.post_num)
    SFTConfig(mode=mode).check_family(family)  # raises the ConfigError that explains the mismatch
    raise AssertionError("unreachable")


def pack_sft_rows(pairs: Sequence[SFTPair], masks: Sequence[tuple[np.ndarray, np.ndarray]], config: Config, *,
                  prompt_length: int, response_length: int, weights: Sequence[float] | None = None) -> Rows:
    """Rows of `pairs[i]` with `masks[i]`: dual-stream for sdar, single-stream for llada/dream."""
    model, train = config.model, config.train
    prompts = [np.asarray(p.prompt) for p in pairs]
    responses = [np.asarray(p.response) for p in pairs]
    noisy = [m[0] for m in masks]
    trained = [m[1] for m in masks]
    if model.family == "sdar":
        return pack_rows(prompts, responses, noisy, trained, prompt_length=prompt_length,
                         response_length=response_length, pad_id=model.pad_token_id, mask_id=model.mask_token_id,
                         block_size=train.block_size, alignment=BlockAlignment(train.block_alignment),
                         weights=weights)
    return pack_rows(prompts, responses, noisy, trained, prompt_length=prompt_length,
                     response_length=response_length, pad_id=model.pad_token_id, mask_id=model.mask_token_id,
                     weights=weights, layout=RowLayout.SINGLE_STREAM)


def sft_rows(pairs: Sequence[SFTPair], config: Config, rng: np.random.Generator, *, mode: str = "block",
             prompt_length: int, response_length: int, shrink: int = 1,
             mask_times_per_sample: int = 1) -> Rows:
    """Training rows of a batch of pairs, in order (every row of pair 0, then of pair 1, ...).

    `mode` is "block" or "trace" for sdar models (dual-stream `Rows`), "semi_ar", "random_masking" or
    "trace" for llada/dream (single-stream `Rows`); see `SFTConfig`.
    """
    SFTConfig(mode=mode).check_family(config.model.family)
    row_pairs, row_masks = [], []
    for pair in pairs:
        for masks in example_masks(pair, config, mode=mode, response_length=response_length, rng=rng,
                                   shrink=shrink, mask_times_per_sample=mask_times_per_sample):
            row_pairs.append(pair)
            row_masks.append(masks)
    if not row_pairs:
        raise ValueError("sft_rows: the pairs yield no training row")
    return pack_sft_rows(row_pairs, row_masks, config, prompt_length=prompt_length, response_length=response_length)


def prepare_pairs(pairs: Sequence[SFTPair], config: Config, *, label: str = "train",
                  log: Callable[[str], None] = print) -> list[SFTPair]:
    """Checks pairs and applies the original's length rules: prompts longer than
    `train.max_prompt_len` are dropped, responses longer than `train.max_response_len` truncated.

    Raises ValueError naming the example for an empty prompt or response, a token id outside the
    vocabulary, or a trace whose length differs from its response's.
    """
    train, vocab = config.train, config.model.vocab_size
    kept, dropped, truncated = [], 0, 0
    for i, pair in enumerate(pairs):
        where = f"{label} example {i}"
        if len(pair.prompt) == 0:
            raise ValueError(f"{where}: empty prompt")
        if len(pair.response) == 0:
            raise ValueError(f"{where}: empty response (SFT responses end with the end-of-turn token)")
        ids = np.concatenate([np.asarray(pair.prompt), np.asarray(pair.response)])
        if ids.min() < 0 or ids.max() >= vocab:
            bad = int(ids[(ids < 0) | (ids >= vocab)][0])
            raise ValueError(f"{where}: token id {bad} is outside the vocabulary [0, model.vocab_size={vocab}) "
                             "(does config.tokenizer match the model?)")
        if pair.trace is not None:
            if len(pair.trace) != len(pair.response):
                raise ValueError(f"{where}: trace has {len(pair.trace)} steps for {len(pair.response)} response tokens")
            if min(pair.trace) < 1:
                raise ValueError(f"{where}: trace steps are 1-based, found {min(pair.trace)}")
        if len(pair.prompt) > train.max_prompt_len:
            dropped += 1
            continue
        if len(pair.response) > train.max_response_len:
            truncated += 1
            cut = train.max_response_len
            pair = SFTPair(pair.prompt, pair.response[:cut], None if pair.trace is None else pair.trace[:cut])
        kept.append(pair)
    if dropped or truncated:
        log(f"SFT {label}: dropped {dropped} examples with prompts over train.max_prompt_len={train.max_prompt_len}, "
            f"truncated {truncated} responses to train.max_response_len={train.max_response_len}")
    return kept


class SFTTrainer:
    """`config.train.steps` updates of `config.train.batch_size` rows from one length bucket each.

    Args:
      policy: the model to fine-tune (its family picks the row layout).
      pairs: training examples; `held_out`: examples for `held_out_loss` (fixed masks).
      mode: shorthand for `sft.mode` (kept for callers that pass only a mode).
      sft: row, bucket, save and eval options (default `config.sft`; mode "auto": the family's).
      mesh: shard parameters, optimizer state and rows on it (`config.mesh` via `make_mesh`).
      tokenizer, eval_tasks: for sampling evals (`evaluate_sampling`, sdar only).
    """

    def __init__(self, config: Config, policy: Decoder, pairs: Sequence[SFTPair], *, workdir: str | Path,
                 mode: str | None = None, held_out: Sequence[SFTPair] = (), log: Callable[[str], None] = print,
                 sft: SFTConfig | None = None, mesh: Mesh | None = None, tokenizer: Any = None,
                 eval_tasks: Sequence[Any] = ()):
        sft = sft or config.sft
        if mode is not None:
            sft = dataclasses.replace(sft, mode=mode)
        if policy.config != config.model:  # e.g. a Hugging Face checkpoint: its own config.json wins
            log(f"SFT: using the policy's model config (family {policy.config.family!r}, block_size "
                f"{policy.config.block_size}) instead of config.model")
            config = dataclasses.replace(config, model=policy.config)
        sft = sft.for_family(config.model.family)
        self.config, self.sft, self.mode = config, sft, sft.mode
        self.family = config.model.family
        self.log = log
        self.loop = RunLoop(workdir, mesh=mesh, log=log, label="SFT", metrics_file="sft_metrics.jsonl",
                            tb_prefix="sft/")
        self.workdir, self.checkpointer = self.loop.workdir, self.loop.checkpointer
        self.mesh = mesh
        self.tokenizer = tokenizer
        self.eval_tasks = list(eval_tasks)
        self.pairs = prepare_pairs(pairs, config, label="train", log=log)
        self.held_out = prepare_pairs(held_out, config, label="held-out", log=log)
        if not self.pairs:
            raise ValueError("SFT needs at least one example (after dropping over-long prompts)")
        train = config.train
        check_batch_fits_mesh(train, mesh)

        everything = self.pairs + self.held_out
        buckets = assign_buckets([len(p.prompt) for p in everything], [len(p.response) for p in everything], sft,
                                 train.block_size)
        self.buckets, held_buckets = buckets[: len(self.pairs)], buckets[len(self.pairs):]
        self.plan = BatchPlan(self.buckets, self._row_counts(self.pairs, self.buckets), train.batch_size,
                              config.experiment.seed)
        self.held_out_plan = (BatchPlan(held_buckets, self._row_counts(self.held_out, held_buckets), train.batch_size,
                                        _HELD_OUT_SEED) if self.held_out else None)
        self._held_out_batches: list[tuple[Any, int]] | None = None
        if len(self.plan.rows_per_bucket) > 1:
            log(f"SFT: {len(self.pairs)} examples, {sum(self.plan.row_counts)} rows in "
                f"{len(self.plan.rows_per_bucket)} length buckets (L0, L1): "
                + ", ".join(f"{b}: {n}" for b, n in self.plan.rows_per_bucket.items()))

        self.graphdef, params = nnx.split(policy)
        # full-attention rows: each row's mean NLL over its trained tokens (the original's LLaDA/Dream rule)
        self.loss_fn = _LOSSES[train.loss_normalization if self.family == "sdar" else "tokens"]
        self.params = self.loop.shard_params(params)
        self.tx, self.step_fn = _train_step(self.graphdef, train, self.loss_fn)
        self.schedule = make_schedule(train)
        self.opt_state = self._on_mesh(self.tx.init(self.params))
        if mesh is not None:
            self.step_fn = pin_layouts(self.step_fn, self.params, self.opt_state, mesh)
        self.step = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------ rows

    def example_masks(self, pair: SFTPair, response_length: int, rng: np.random.Generator):
        """The (noisy, trained) masks of every row of `pair` under this trainer's mode."""
        return example_masks(pair, self.config, mode=self.mode, response_length=response_length, rng=rng,
                             shrink=self.sft.shrink, mask_times_per_sample=self.sft.mask_times_per_sample)

    def _row_counts(self, pairs: Sequence[SFTPair], buckets) -> list[int]:
        # Row counts do not depend on the random draws (every mode keeps each row non-empty).
        return [len(self.example_masks(p, b[1], np.random.default_rng(0))) for p, b in zip(pairs, buckets)]

    def batch_rows(self, planned: PlannedBatch, pairs: Sequence[SFTPair], row_counts: Sequence[int],
                   rng_key: Sequence[int]) -> tuple[Rows, int]:
        """Host rows of a planned batch, padded to `batch_size` with rows that weigh 0; real rows
        weigh batch_size / real so the update is the mean over real rows. Returns (rows, real)."""
        prompt_length, response_length = planned.bucket
        masks = {}
        for example in dict.fromkeys(e for e, _ in planned.entries):
            rng = np.random.default_rng([*rng_key, example, _MASK_SALT])
            masks[example] = self.example_masks(pairs[example], response_length, rng)
            if len(masks[example]) != row_counts[example]:
                raise AssertionError(f"example {example}: {len(masks[example])} rows, planned {row_counts[example]}")
        row_pairs = [pairs[e] for e, _ in planned.entries]
        row_masks = [masks[e][r] for e, r in planned.entries]
        real, size = len(row_pairs), self.config.train.batch_size
        for _ in range(size - real):
            row_pairs.append(row_pairs[0])
            row_masks.append((row_masks[0][0], np.zeros_like(row_masks[0][1])))
        weights = np.where(np.arange(size) < real, size / real, 0.0)
        rows = pack_sft_rows(row_pairs, row_masks, self.config, prompt_length=prompt_length,
                             response_length=response_length, weights=weights)
        return rows, real

    def rows_for_step(self, step: int) -> tuple[Rows, int, int, PlannedBatch]:
        """(rows, real rows, epoch, planned batch) of update `step` (0-based)."""
        epoch, planned = self.plan.locate(step)
        rows, real = self.batch_rows(planned, self.pairs, self.plan.row_counts,
                                     (self.config.experiment.seed, epoch))
        return rows, real, epoch, planned

    # ------------------------------------------------------------------ placement

    def _on_mesh(self, tree: Any) -> Any:
        return self.loop.place_state(tree, self.params)

    def place_rows(self, rows: Rows) -> Rows:
        """Device rows: the batch axis sharded over the mesh's data axes (or one device)."""
        return self.loop.place_batch(rows)

    # ------------------------------------------------------------------ steps and evals

    def train_step(self, resources: Any = None) -> dict:
        """One update; returns its metrics record (`resources`: the run loop's, unused)."""
        rows, real, epoch, planned = self.rows_for_step(self.step)
        learning_rate = float(self.schedule(self.step))
        self.params, self.opt_state, metrics = self.step_fn(self.params, self.opt_state, self.place_rows(rows))
        self.step += 1
        return {"step": self.step, "epoch": epoch, "loss": float(metrics["loss"]),
                "nll_per_token": float(metrics["nll_per_token"]), "grad_norm": float(metrics["grad_norm"]),
                "rows": real, "tokens": int(rows.loss_mask[:real].sum()), "bucket": list(planned.bucket),
                "learning_rate": learning_rate}

    def held_out_loss(self) -> float:
        """Mean SFT loss over the held-out rows under fixed masks (seed 0)."""
        if self.held_out_plan is None:
            raise ValueError("held_out_loss: the trainer has no held-out examples")
        if self._held_out_batches is None:
            self._held_out_batches = []
            for planned in self.held_out_plan.epoch(0):
                rows, real = self.batch_rows(planned, self.held_out, self.held_out_plan.row_counts,
                                             (_HELD_OUT_SEED, 0, 1))
                self._held_out_batches.append((self.place_rows(rows), real))
        total = sum(float(_eval_loss(self.graphdef, self.params, rows, self.loss_fn)) * real
                    for rows, real in self._held_out_batches)
        return total / sum(real for _, real in self._held_out_batches)

    def evaluate_sampling(self, block_sizes: Sequence[int] | None = None, pool=None) -> dict[int, list]:
        """`tradojax.evaluation.evaluate` on the eval tasks at each sampling block size.

        Denoising steps scale with the block (steps/block kept, e.g. 4/4 -> 8/8).
        """
        if self.family != "sdar":
            raise ValueError("sampling evals need the block-diffusion sampler (model.family 'sdar'), "
                             f"got {self.family!r}")
        if self.tokenizer is None or not self.eval_tasks:
            raise ValueError("evaluate_sampling: the trainer needs a tokenizer and eval_tasks")
        sampling = self.config.sampling
        block_sizes = list(block_sizes or self.sft.eval_block_sizes or (sampling.block_size,))
        model = self.policy()
        results = {}
        for block in block_sizes:
            steps = max(1, min(block, round(sampling.denoising_steps * block / sampling.block_size)))
            config = dataclasses.replace(self.config, sampling=dataclasses.replace(
                sampling, block_size=block, denoising_steps=steps))
            results[block] = evaluate(model, self.tokenizer, self.eval_tasks, config, pool=pool, mesh=self.mesh,
                                      seed=self.config.experiment.seed)
        return results

    def evaluate(self, pool=None) -> dict:
        """The eval metrics of the current parameters: held-out loss and sampling accuracy."""
        record: dict[str, float] = {}
        if self.held_out_plan is not None:
            record["held_out_loss"] = self.held_out_loss()
        if self.eval_tasks and self.tokenizer is not None and self.family == "sdar":
            for block, results in self.evaluate_sampling(pool=pool).items():
                record |= eval_metrics(results, f"eval/b{block}/", ("accuracy", "mean_length", "tokens_per_step"))
        return record

    def policy(self) -> Decoder:
        """The trained model. After block-size adaptation (block/trace SFT at a `train.block_size`
        other than the model's), its config names the new native block size (exported as such)."""
        model = nnx.merge(self.graphdef, self.params)
        if self.family == "sdar" and self.config.train.block_size != model.config.block_size:
            model.config = dataclasses.replace(model.config, block_size=self.config.train.block_size)
        return model

    # ------------------------------------------------------------------ checkpoints

    def _meta(self) -> dict:
        # "model": the exported model's config (block-size adaptation included), for readers of the run
        return {"step": self.step, "history": self.history, "config": to_dict(self.config), "mode": self.mode,
                "model": to_dict(self.policy().config),
                "sft": to_dict(self.sft), "plan": self.plan.fingerprint()}

    def save(self) -> None:
        """Checkpoints params, optimizer state and the run record at the current step."""
        self.loop.save(self.step, {"policy": self.params, "policy_opt": self.opt_state}, self._meta())

    def restore(self) -> bool:
        """Loads the newest intact checkpoint of the workdir (damaged steps skipped); False if none.
        A checkpoint of other data or batching is a CheckpointError."""
        def other_plan(meta: dict) -> str | None:
            saved_plan = meta.get("plan")
            if saved_plan is None or saved_plan == json.loads(json.dumps(self.plan.fingerprint())):
                return None
            return (f"{self.checkpointer.directory}/{meta['step']}: the checkpoint was trained on other data or "
                    f"batching (saved {saved_plan}, now {self.plan.fingerprint()}); resume needs the same examples, "
                    "mode, buckets, batch size and seed")

        restored = self.loop.restore({"policy": self.params, "policy_opt": self.opt_state}, refuse=other_plan)
        if restored is None:
            return False
        _, trees, meta = restored
        self.params, self.opt_state = trees["policy"], self._on_mesh(trees["policy_opt"])
        self.step, self.history = int(meta["step"]), list(meta["history"])
        return True

    # ------------------------------------------------------------------ the run

    def run(self, *, resume: bool = False, save_every: int | None = None, eval_every: int | None = None,
            on_step: Callable[[dict], None] | None = None) -> list[dict]:
        """Trains to `config.train.steps`; saves every `save_every` steps and at the end, evaluates
        every `eval_every` (defaults: `sft.save_every` / `sft.eval_every`; 0 = never). A SIGTERM
        finishes the current step, saves, and raises `Preempted`. `on_step`: on process 0."""
        save_every = self.sft.save_every if save_every is None else save_every
        eval_every = self.sft.eval_every if eval_every is None else eval_every
        sampling_evals = eval_every and self.eval_tasks and self.tokenizer is not None and self.family == "sdar"
        resources = None
        if sampling_evals:
            resources = lambda: RewardPool(num_workers=self.config.rl.reward_workers)  # noqa: E731
        return self.loop.run(self, steps=self.config.train.steps, save_every=save_every, eval_every=eval_every,
                             resume=resume, resources=resources, on_step=on_step)


_LOSSES: dict[str, Callable] = {
    "padded_length": functools.partial(sft_loss, normalization="padded_length"),
    "tokens": functools.partial(sft_loss, normalization="tokens"),
}
def _train_step(graphdef: nnx.GraphDef, train: TrainConfig, loss_fn: Callable):
    """(optimizer, compiled update), shared by trainers of the same model, optimizer and loss, so
    a second trainer in a process (a resume, an adaptation run, tests) compiles nothing new."""
    optimizer = tuple(getattr(train, name) for name in (
        "learning_rate", "schedule", "warmup_steps", "min_lr_ratio", "weight_decay", "b1", "b2", "eps",
        "max_grad_norm"))
    if train.schedule != "constant":  # a decaying schedule depends on the run length
        optimizer += (train.steps,)

    def build():
        tx = make_optimizer(train)
        return tx, make_train_step(graphdef, tx, loss_fn, train.num_micro_batches)

    return compiled_update(("sft", graphdef, optimizer, loss_fn, train.num_micro_batches), build)


@functools.partial(jax.jit, static_argnames=("graphdef", "loss_fn"))
def _eval_loss(graphdef, params, rows, loss_fn) -> jax.Array:
    return loss_fn(nnx.merge(graphdef, params), rows, None)[0]

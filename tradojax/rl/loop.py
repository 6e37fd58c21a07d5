"""The RL loop as one program (one process per host): rollout -> rewards (host pool, overlapped)
-> (value) -> policy update -> metrics -> checkpoint -> periodic eval (spec section 3.1, without
the disk round trips).

A step is four roles, run in order by `RLTrainer.run_step`: the rollout (the sampler generates
from the current parameters), the reward (the host pool scores the responses while the device
computes every candidate row's old log-probs), the value (filtering, old log-probs of the kept
rows, and with a value model its GAE advantages and update) and the learner (the policy updates).
Everything around the steps (placement, checkpoints and resume, SIGTERM, metrics, eval
scheduling, reporting) is the shared shell, `tradojax.training.run_loop.RunLoop`.

The sampler reads the policy parameters in memory; rewards are scored by a host process pool
while the device computes the old log-probs of every candidate row; rows carry the generated
token ids and traces, never re-tokenised text. A SIGTERM (a preempted TPU VM) finishes the
current step, saves, and exits; `resume=True` continues to the same parameters as an
uninterrupted run (rollouts, task choice and row masks are functions of (seed, step)).

On a mesh, parameters and optimizer state are sharded ("train" rules) and every batch is split
over the data axes; across hosts each process runs the same host work on the same data.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tradojax.config import Config, ConfigError, to_dict
from tradojax.data.pipeline import TaskSampler
from tradojax.data.tasks import task_kind
from tradojax.data.templates import task_prompt
from tradojax.evaluation import evaluate
from tradojax.models.transformer import Decoder
from tradojax.models.value import ValueModel, value_model_from_policy
from tradojax.ops.masks import BlockAlignment
from tradojax.parallel.mesh import batch_sharding
from tradojax.parallel.sharding import to_host
from tradojax.rewards import RewardPool
from tradojax.rl.advantages import difficulty_filter, group_zscore, outcome_token_rewards, trace_gae
from tradojax.rl.full_rows import full_row_builder
from tradojax.rl.losses import policy_loss, value_loss
from tradojax.rl.methods import row_builder
from tradojax.sampling.block_diffusion import prompt_bucket
from tradojax.sampling.full_diffusion import FAMILIES as FULL_ATTENTION_FAMILIES, sampler_for
from tradojax.training.row_masks import TraceRound
from tradojax.training.rows import RowLayout, Rows, pack_rows, round_up
from tradojax.training.run_loop import Preempted, RunLoop, check_batch_fits_mesh, eval_metrics
from tradojax.training.step import (make_optimizer, make_train_step, masked_normaliser, noisy_token_logprobs,
                                   pin_layouts, with_learning_rate, within_step_cosine)


# ----------------------------------------------------------------------------------------------
# Rows of one step
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StepRows:
    """The training rows of one RL step (host numpy) and where each came from."""

    rows: Rows
    response: np.ndarray  # [R] index of the rollout row (response) of each training row
    rounds: list[TraceRound]
    num_real: int  # rows beyond this are padding (weight 0)
    source: np.ndarray | None = None  # for a selection: the candidate row of each row


def row_layout(config: Config) -> RowLayout:
    """Full-attention families (LLaDA, Dream) train single-stream rows (spec 3.10, 4), SDAR dual-stream."""
    return RowLayout.SINGLE_STREAM if config.model.family in FULL_ATTENTION_FAMILIES else RowLayout.DUAL_STREAM


def build_step_rows(
    config: Config,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    traces: Sequence[np.ndarray],
    prompt_length: int,
    rng: np.random.Generator,
) -> StepRows | None:
    """Rows for every response, padded to a multiple of `train.batch_size` rows."""
    train, rl = config.train, config.rl
    layout = row_layout(config)
    builder = (full_row_builder(rl.method, rl.mask_times_per_sample) if layout is RowLayout.SINGLE_STREAM
               else row_builder(rl.method))
    alignment = BlockAlignment(train.block_alignment)
    response_length = config.sampling.max_new_tokens
    prompt_ids, response_ids, noisy, trained, origin, rounds = [], [], [], [], [], []
    pad_id = config.model.pad_token_id
    for r in range(len(responses)):
        # an EOS equal to the pad id is a pad, trained only through post_num (the original)
        ends_with_pad = len(responses[r]) > 0 and int(responses[r][-1]) == pad_id
        made = builder(np.asarray(traces[r]), len(responses[r]), response_length=response_length,
                       prompt_length=len(prompts[r]), block_size=train.block_size, shrink=rl.shrink,
                       post_num=train.post_num, alignment=alignment, lower_p=train.lower_p,
                       upper_p=train.upper_p, rng=rng, ends_with_pad=ends_with_pad)
        for row in made:
            prompt_ids.append(np.asarray(prompts[r]))
            response_ids.append(np.asarray(responses[r]))
            noisy.append(row.noisy)
            trained.append(row.trained)
            origin.append(r)
            rounds.append(row)
    if not origin:
        return None
    num_real = len(origin)
    total = round_up(num_real, train.batch_size)
    for _ in range(total - num_real):  # padding rows: a copy of row 0 that trains nothing
        prompt_ids.append(prompt_ids[0])
        response_ids.append(response_ids[0])
        noisy.append(noisy[0])
        trained.append(np.zeros_like(trained[0]))
        origin.append(origin[0])
    weights = np.zeros(total, np.float32)
    weights[:num_real] = 1.0
    rows = pack_rows(prompt_ids, response_ids, noisy, trained, prompt_length=prompt_length,
                     response_length=response_length, pad_id=config.model.pad_token_id,
                     mask_id=config.model.mask_token_id, block_size=train.block_size, alignment=alignment,
                     weights=weights, layout=layout)
    return StepRows(rows=rows, response=np.asarray(origin), rounds=rounds, num_real=num_real)


def step_loss_scale(config: Config, kept_lengths: np.ndarray, padded_length: int) -> float:
    """The factor on every row's weight that makes the update's loss the original's.

    With `train.loss_normalization="padded_length"` the loss divides each row by the rows' padded
    length (`sampling.max_new_tokens`); the original divides by L1, the step's longest response
    (of the rows it trains) capped at `train.max_response_len`: the factor padded_length / L1.
    `rl.original_accumulation_steps = N` divides by N once more (the original's loss is divided by
    N by the script and again by DeepSpeed: spec 3.6).
    """
    scale = 1.0
    if config.train.loss_normalization == "padded_length":
        longest = int(np.max(kept_lengths)) if len(kept_lengths) else padded_length
        scale *= padded_length / max(min(longest, config.train.max_response_len), 1)
    if config.rl.original_accumulation_steps:
        scale /= config.rl.original_accumulation_steps
    return scale


def update_batches(tree, batch_size: int, num_real: int, drop_partial: bool) -> list:
    """The update batches of `tree`'s rows; with `drop_partial` (the original under DeepSpeed's
    accumulation boundary) a last batch with padding rows is not applied."""
    batches = list(batch_slices(tree, batch_size))
    if drop_partial and num_real % batch_size:
        batches = batches[:-1]
    return batches


def batch_slices(tree, batch_size: int):
    """Consecutive `batch_size`-row slices of every leaf of `tree` (rows, or (rows, extras))."""
    length = jax.tree.leaves(tree)[0].shape[0]
    for start in range(0, length, batch_size):
        yield jax.tree.map(lambda x: x[start:start + batch_size], tree)


# ----------------------------------------------------------------------------------------------
# Compiled pieces
# ----------------------------------------------------------------------------------------------


def policy_loss_fn(config: Config):
    train, rl = config.train, config.rl

    def loss_fn(model, rows: Rows, extra):
        logp = noisy_token_logprobs(model, rows)
        normaliser = masked_normaliser(rows, train.loss_normalization)
        ref = extra.get("ref_logp")
        # LLaDA/Dream (single-stream rows) sum the KL over a row's tokens (spec 3.10)
        kl_normaliser = jnp.ones_like(normaliser) if rows.layout is RowLayout.SINGLE_STREAM else None
        loss, metrics = policy_loss(logp, extra["old_logp"], extra["advantages"], rows.loss_mask, normaliser,
                                    clip_eps=rl.clip_eps, beta=rl.beta, kl_estimator=rl.kl_estimator,
                                    ref_logp=ref, row_weights=rows.weights, kl_normaliser=kl_normaliser)
        return loss, metrics

    return loss_fn


def _value_loss_fn(config: Config):
    def loss_fn(model: ValueModel, rows: Rows, extra):
        values = model(rows.tokens, rows.positions, rows.segments)[:, -rows.targets.shape[1]:]
        normaliser = masked_normaliser(rows, config.train.loss_normalization)
        return value_loss(values, extra["old_values"], extra["returns"], rows.loss_mask, normaliser,
                          clip_eps=config.rl.clip_eps, row_weights=rows.weights)

    return loss_fn


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logprobs(graphdef, params, rows):
    return noisy_token_logprobs(nnx.merge(graphdef, params), rows)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logprobs_and_entropy(graphdef, params, rows):
    return noisy_token_logprobs(nnx.merge(graphdef, params), rows, with_entropy=True)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _values(graphdef, params, rows):
    return nnx.merge(graphdef, params)(rows.tokens, rows.positions, rows.segments)[:, -rows.targets.shape[1]:]


def forward_batch_size(config: Config) -> int:
    """Rows per forward-only pass (old and reference log-probs, old values): one micro-batch, so
    that their logits ([rows, L1, vocab]) take no more memory than an update's micro-step."""
    return config.train.micro_batch_size or config.train.batch_size


def rollout_sampling(config: Config):
    """The RL rollout's sampler settings: `sampling` with `rl.num_responses_per_task` samples per task."""
    return dataclasses.replace(config.sampling, num_samples=config.rl.num_responses_per_task)


def optimizers(config: Config):
    """(policy AdamW, value AdamW or None) as the trainer builds them."""
    host_rate = config.rl.optimizer_per_step == "reset_cosine"  # the LR is set from the host per update
    tx = make_optimizer(config.train, host_learning_rate=host_rate)
    value_tx = (make_optimizer(config.train, learning_rate=config.rl.value_learning_rate, host_learning_rate=host_rate)
                if config.rl.value_model else None)
    return tx, value_tx


def update_steps(config: Config, graphdef, tx, value_graphdef=None, value_tx=None):
    """(policy update, value update or None), unpinned (`pin_layouts` places them on a mesh)."""
    num_micro = config.train.num_micro_batches
    policy = make_train_step(graphdef, tx, policy_loss_fn(config), num_micro)
    value = (make_train_step(value_graphdef, value_tx, _value_loss_fn(config), num_micro)
             if value_graphdef is not None else None)
    return policy, value


def rl_programs(config: Config, mesh, graphdef, params, opt_state, *, prompt_length: int,
                value_graphdef=None, value_params=None, value_opt_state=None) -> dict[str, tuple]:
    """The jitted functions `RLTrainer.run_step` calls after the rollout, each as
    `(fn, args, kwargs)` with `fn.lower(*args, **kwargs)` lowering exactly what the step runs:
    the old log-prob (+ entropy) pass, the reference log-probs (kl_reference="initial"), the
    policy update, and with a value model the old-value pass and the value update. Arguments may
    be abstract (ShapeDtypeStructs carrying their shardings, params and optimizer state laid out
    as the trainer lays them); rows take the shapes of `prompt_length` (the prompt bucket) and
    `sampling.max_new_tokens`. Used by `tradojax aot`."""
    train, rl = config.train, config.rl
    tx, value_tx = optimizers(config)
    policy_fn, value_fn = update_steps(config, graphdef, tx, value_graphdef, value_tx)
    one = pack_rows([np.ones(1, np.int32)], [np.ones(1, np.int32)], [np.ones(config.sampling.max_new_tokens, bool)],
                    [np.ones(config.sampling.max_new_tokens, bool)], prompt_length=prompt_length,
                    response_length=config.sampling.max_new_tokens, pad_id=config.model.pad_token_id,
                    mask_id=config.model.mask_token_id, block_size=train.block_size,
                    alignment=BlockAlignment(train.block_alignment), layout=row_layout(config))

    def batch_of(tree, rows: int):  # the leaves of `tree` with `rows` rows, placed as `RLTrainer.place` does
        def one_leaf(x):
            x = jnp.asarray(x)
            sharding = batch_sharding(mesh, x.ndim) if mesh is not None else None
            return jax.ShapeDtypeStruct((rows, *x.shape[1:]), x.dtype, sharding=sharding)

        return jax.tree.map(one_leaf, tree)

    forward_rows, update_rows = batch_of(one, forward_batch_size(config)), batch_of(one, train.batch_size)
    l1 = config.sampling.max_new_tokens
    per_token = np.zeros((1, l1), np.float32)
    extra = {"old_logp": per_token, "advantages": per_token if rl.value_model else np.zeros((1,), np.float32)}
    if rl.kl_reference == "initial":
        extra["ref_logp"] = per_token
    pin = (lambda fn, p, o: fn) if mesh is None else (lambda fn, p, o: pin_layouts(fn, p, o, mesh))
    programs = {
        "old_logprobs": (_logprobs_and_entropy, (graphdef, params, forward_rows), {}),
        "policy_update": (pin(policy_fn, params, opt_state), (params, opt_state, update_rows, batch_of(extra, train.batch_size)), {}),
    }
    if rl.kl_reference == "initial":
        programs["ref_logprobs"] = (_logprobs, (graphdef, params, forward_rows), {})
    if value_graphdef is not None:
        value_extra = batch_of({"old_values": per_token, "returns": per_token}, train.batch_size)
        programs["old_values"] = (_values, (value_graphdef, value_params, forward_rows), {})
        programs["value_update"] = (pin(value_fn, value_params, value_opt_state),
                                    (value_params, value_opt_state, update_rows, value_extra), {})
    return programs


def _chunked(fn, graphdef, params, rows: Rows, batch_size: int, place: Callable) -> Any:
    """Runs `fn` over rows in batches of `batch_size` (one compiled shape, each batch put on the
    devices by `place`) and concatenates its output (an array or a tuple of them); async on device."""
    outputs = [fn(graphdef, params, place(chunk)) for chunk in batch_slices(rows, batch_size)]
    return jax.tree.map(lambda *parts: jnp.concatenate(parts), *outputs)


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------


class RLTrainer:
    """Runs `config.rl.steps` RL steps from `policy`, writing to `workdir`.

    The trainer takes `policy`'s arrays over: updates donate them (no second copy of the weights),
    so pass a copy to start several runs from one model."""

    def __init__(self, config: Config, policy: Decoder, tokenizer, *, workdir: str | Path, train_tasks,
                 eval_tasks=(), mesh=None, log: Callable[[str], None] = print):
        self.config = config
        self.tokenizer = tokenizer
        self.loop = RunLoop(workdir, mesh=mesh, log=log)
        self.workdir = self.loop.workdir
        self.checkpointer = self.loop.checkpointer
        self.train_tasks = list(train_tasks)
        self.eval_tasks = list(eval_tasks)
        self.mesh = mesh
        self.log = log
        rl = config.rl
        self.kind = task_kind(self.train_tasks)
        self.sampling = rollout_sampling(config)
        if rl.value_model and policy.config.family in FULL_ATTENTION_FAMILIES:
            raise ConfigError(f"rl.value_model: the value model (GAE over trace steps, spec 3.7) is for block-"
                              f"diffusion models; the {policy.config.family} RL of the original has none (spec 3.10)")
        self.sampler = sampler_for(policy, self.sampling, mesh=mesh)  # by the policy's family
        self.graphdef, self.params = nnx.split(policy)
        check_batch_fits_mesh(config.train, mesh)
        self.params = self.loop.shard_params(self.params)
        self.tx, self.value_tx = optimizers(config)
        self.opt_state = self._place_state(self.tx.init(self.params))
        self.ref_params = jax.tree.map(jnp.copy, self.params) if rl.kl_reference == "initial" else None
        self.value_graphdef = None
        if rl.value_model:
            value = value_model_from_policy(policy)
            self.value_graphdef, self.value_params = nnx.split(value)
            self.value_params = self.loop.shard_params(self.value_params)
            self.value_opt_state = self._place_state(self.value_tx.init(self.value_params))
        policy_step, value_step = update_steps(config, self.graphdef, self.tx, self.value_graphdef, self.value_tx)
        self.policy_step = self._pinned(policy_step, self.params, self.opt_state)
        if rl.value_model:
            self.value_step = self._pinned(value_step, self.value_params, self.value_opt_state)
        # Every host takes the whole step (shard 0 of 1): the rollout is one global batch split over the
        # mesh, gathered back to each host, which then scores and builds the same rows (host work is
        # repeated, device work is split); updates read each host's shards of those rows.
        self.task_sampler = TaskSampler(self.train_tasks, num_task_per_step=rl.num_tasks_per_step,
                                        num_response_per_task=rl.num_responses_per_task, seed=config.experiment.seed,
                                        shard_index=0, shard_count=1)
        self._prompt_cache: dict[int, list[int]] = {}
        self._task_prompt = lambda task: list(task_prompt(
            tokenizer, task, start_with_think=config.data.start_with_think,
            strip_final_newline=config.data.strip_final_newline).token_ids)
        self.step = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------ placement

    def _place_state(self, tree: Any) -> Any:
        return self.loop.place_state(tree, self.params)

    def _pinned(self, step_fn: Callable, params: Any, opt_state: Any) -> Callable:
        return step_fn if self.mesh is None else pin_layouts(step_fn, params, opt_state, self.mesh)

    def place(self, tree: Any) -> Any:
        """Host rows (or extras) on the devices: the batch axis split over the mesh's data axes."""
        return self.loop.place_batch(tree)

    def _step_learning_rates(self, peak: float, num_updates: int) -> list[float | None]:
        """Per-update learning rates set from the host ("reset_cosine"), else None (the optimizer's schedule)."""
        if self.config.rl.optimizer_per_step != "reset_cosine":
            return [None] * num_updates
        return within_step_cosine(peak, num_updates).tolist()

    # ------------------------------------------------------------------ state

    def _trees(self) -> dict[str, Any]:
        trees = {"policy": self.params, "policy_opt": self.opt_state}
        if self.config.rl.value_model:
            trees |= {"value": self.value_params, "value_opt": self.value_opt_state}
        return trees

    def save(self) -> None:
        meta = {"step": self.step, "task_sampler": self.task_sampler.get_state(), "history": self.history,
                "config": to_dict(self.config)}
        self.loop.save(self.step, self._trees(), meta)

    def restore(self) -> bool:
        """Loads the newest intact checkpoint of the workdir (damaged steps skipped); False if none."""
        restored = self.loop.restore(self._trees())
        if restored is None:
            return False
        _, trees, meta = restored
        self.params, self.opt_state = trees["policy"], self._place_state(trees["policy_opt"])
        if self.config.rl.value_model:
            self.value_params, self.value_opt_state = trees["value"], self._place_state(trees["value_opt"])
        self.task_sampler.set_state(meta["task_sampler"])
        self.step = int(meta["step"])
        self.history = list(meta["history"])
        return True

    # ------------------------------------------------------------------ one step

    def prompt_ids(self, task_index: int, task) -> list[int]:
        if task_index not in self._prompt_cache:
            self._prompt_cache[task_index] = self._task_prompt(task)
        return self._prompt_cache[task_index]

    def run_step(self, pool) -> dict:
        """The body of step `step` (0-based), role by role; returns its metrics (`step` not advanced)."""
        config, rl = self.config, self.config.rl
        timings: dict[str, float] = {}
        # -- rollout role: the sampler generates from the current parameters
        clock = time.perf_counter()
        self.loop.phase("rollout")
        task_step = self.task_sampler.step_tasks(self.step)
        prompts = [self.prompt_ids(i, t) for i, t in zip(task_step.task_indices, task_step.tasks)]
        key = jax.random.fold_in(jax.random.key(config.experiment.seed), self.step)
        rollout = self.sampler.generate(prompts, rng=key, params=self.params).to_numpy()
        responses = rollout.responses()
        timings["rollout_s"] = time.perf_counter() - clock

        # -- reward role: rewards on the host pool, while the device builds and scores every candidate row
        clock = time.perf_counter()
        self.loop.phase("reward")
        texts = [self.tokenizer.decode(r, skip_special_tokens=False) for r in responses]
        items = [task_step.tasks[i] for i in rollout.prompt_index]  # typed tasks: no JSON round trip
        batch = pool.submit_batch(self.kind, items, texts, response_lengths=rollout.lengths.tolist(),
                                  max_tokens=self.sampling.max_new_tokens)
        rollout_prompts = [prompts[i] for i in rollout.prompt_index]
        traces = [rollout.trace[r, : rollout.lengths[r]] for r in range(len(responses))]
        row_rng = np.random.default_rng([config.experiment.seed, self.step, 0x5EED])
        prompt_length = prompt_bucket(max(len(p) for p in prompts), self.sampling.prompt_buckets)
        all_rows = build_step_rows(config, rollout_prompts, responses, traces, prompt_length, row_rng)
        old_logp_all, entropy_all = _chunked(_logprobs_and_entropy, self.graphdef, self.params, all_rows.rows,
                                             forward_batch_size(config), self.place)
        results = batch.result()
        timings["reward_s"] = time.perf_counter() - clock

        groups, k = len(task_step.tasks), rl.num_responses_per_task
        scores = np.array([r.score for r in results], np.float64).reshape(groups, k)
        correct = np.array([r.correct for r in results], bool).reshape(groups, k)
        raw_correct = np.array([r.details.get("raw_correct", r.correct) for r in results], bool)
        advantages = group_zscore(scores if self.kind == "code" else correct.astype(np.float64))
        if self.kind == "math":
            keep_groups = difficulty_filter(correct, rl.difficulty_lower, rl.difficulty_upper)
        else:  # the original drops a code task only when all its z-scores are 0
            keep_groups = np.abs(advantages).sum(axis=1) > 0
        keep = np.repeat(keep_groups, k)
        metrics = {
            "step": self.step + 1,
            "reward": float(scores.mean()),
            "accuracy": float(raw_correct.mean()),
            "accuracy_after_truncation": float(correct.mean()),
            "response_length": float(rollout.lengths.mean()),
            "tokens_per_step": float(rollout.lengths.sum() / max(rollout.num_steps.sum(), 1)),
            "kept_groups": int(keep_groups.sum()),
        }

        # the original trains no response of a prompt longer than train.max_prompt_len
        prompt_fits = np.array([len(p) <= config.train.max_prompt_len for p in rollout_prompts])
        metrics["dropped_long_prompts"] = int((~prompt_fits).sum())

        # -- value role: the kept rows, their old log-probs and advantages (GAE with a value model)
        clock = time.perf_counter()
        self.loop.phase("value")
        row_keep = (keep & prompt_fits)[all_rows.response] & (np.arange(len(all_rows.response)) < all_rows.num_real)
        if not row_keep.any():
            self.log(f"step {self.step + 1}: every group filtered out (accuracy {metrics['accuracy']:.3f}); no update")
            metrics |= timings
            return metrics
        step_rows = _select_rows(all_rows, row_keep, config.train.batch_size)
        scale = step_loss_scale(config, rollout.lengths[step_rows.response[: step_rows.num_real]],
                                step_rows.rows.response_length)
        step_rows.rows = dataclasses.replace(step_rows.rows, weights=step_rows.rows.weights * np.float32(scale))
        old_logp = to_host(old_logp_all)[step_rows.source]
        # sampler vs trainer: the same token's log-prob under the rollout and under the row
        sampler_logp = rollout.logprobs[step_rows.response][:, :step_rows.rows.targets.shape[1]]
        mask = step_rows.rows.loss_mask
        metrics["sampler_trainer_logp_gap"] = float(np.abs(old_logp - sampler_logp)[mask].mean())
        # the rollout policy's entropy (nats) at the trained positions
        metrics["entropy"] = float(to_host(entropy_all)[step_rows.source][mask].mean())
        response_adv = advantages.reshape(-1)
        if rl.value_model:
            token_adv, value_metrics = self._value_phase(step_rows, response_adv, rollout)
            metrics |= value_metrics
            row_advantages = token_adv
        else:
            row_advantages = response_adv[step_rows.response].astype(np.float32)
        timings["value_s"] = time.perf_counter() - clock

        # -- learner role: the policy updates
        clock = time.perf_counter()
        self.loop.phase("update")
        if rl.optimizer_per_step != "keep":
            self.opt_state = self._place_state(self.tx.init(self.params))
        ref_logp = (to_host(_chunked(_logprobs, self.graphdef, self.ref_params, step_rows.rows,
                                     forward_batch_size(config), self.place))
                    if self.ref_params is not None else None)
        update_metrics = []
        extras = {"old_logp": old_logp, "advantages": row_advantages}
        if ref_logp is not None:
            extras["ref_logp"] = ref_logp
        batches = update_batches((step_rows.rows, extras), config.train.batch_size, step_rows.num_real,
                                 drop_partial=bool(rl.original_accumulation_steps)) * rl.epochs_per_step
        rates = self._step_learning_rates(config.train.learning_rate, len(batches))
        for (rows, extra), rate in zip(batches, rates):
            if rate is not None:
                self.opt_state = with_learning_rate(self.opt_state, rate)
            self.params, self.opt_state, m = self.policy_step(self.params, self.opt_state, *self.place((rows, extra)))
            update_metrics.append(m)
        if rates and rates[0] is not None:
            metrics["learning_rate"] = float(np.mean(rates))
        for name in ("kl", "clip_fraction", "ratio_mean", "pg_loss", "grad_norm"):
            if update_metrics:
                metrics[name] = float(np.mean([float(m[name]) for m in update_metrics]))
        metrics["updates"] = len(update_metrics)
        metrics["rows"] = int(step_rows.num_real)
        timings["update_s"] = time.perf_counter() - clock
        return metrics | timings

    def _value_phase(self, step_rows: StepRows, response_adv: np.ndarray, rollout) -> tuple[np.ndarray, dict]:
        """Old values -> per-token GAE over the trace steps -> value update (every k steps)."""
        config, rl = self.config, self.config.rl
        rows = step_rows.rows
        old_values = to_host(_chunked(_values, self.value_graphdef, self.value_params, rows, forward_batch_size(config),
                                      self.place))
        length = rows.targets.shape[1]
        returns = np.zeros_like(old_values)
        token_adv = np.zeros_like(old_values)
        for response in np.unique(step_rows.response[: step_rows.num_real]):
            members = np.flatnonzero(step_rows.response[: step_rows.num_real] == response)
            token_values = np.zeros(length)
            trainable = np.zeros(length, bool)
            for m in members:
                trained = rows.loss_mask[m]
                token_values[trained] = old_values[m][trained]
                trainable |= trained
            steps = step_rows.rounds[members[0]].steps
            rewards = outcome_token_rewards(float(response_adv[response]), steps, trainable)
            ret, adv = trace_gae(rewards, token_values, steps, trainable, rl.gamma, rl.lam)
            for m in members:
                trained = rows.loss_mask[m]
                returns[m][trained] = ret[trained]
                token_adv[m][trained] = adv[trained]
        metrics = {}
        if (self.step + 1) % rl.train_value_every == 0:  # the original's 1-based epoch
            losses = []
            extras = {"old_values": old_values, "returns": returns}
            if rl.optimizer_per_step != "keep":
                self.value_opt_state = self._place_state(self.value_tx.init(self.value_params))
            batches = update_batches((rows, extras), config.train.batch_size, step_rows.num_real,
                                     drop_partial=bool(rl.original_accumulation_steps))
            for (chunk, extra), rate in zip(batches, self._step_learning_rates(rl.value_learning_rate, len(batches))):
                if rate is not None:
                    self.value_opt_state = with_learning_rate(self.value_opt_state, rate)
                self.value_params, self.value_opt_state, m = self.value_step(
                    self.value_params, self.value_opt_state, *self.place((chunk, extra)))
                losses.append(float(m["value_loss"]))
            if losses:
                metrics["value_loss"] = float(np.mean(losses))
        mask = rows.loss_mask
        target, predicted = returns[mask], old_values[mask]
        variance = target.var()
        metrics["value_explained_variance"] = float(1 - (target - predicted).var() / variance) if variance > 0 else 0.0
        return token_adv.astype(np.float32), metrics

    # ------------------------------------------------------------------ the run

    def train_step(self, pool) -> dict:
        """One RL step (`run_step`) as the run loop takes it: advances `step`."""
        metrics = self.run_step(pool)
        self.step += 1
        return metrics

    def evaluate(self, pool) -> dict:
        """Eval accuracy and mean length of the current policy per (strategy, top_k)."""
        results = evaluate(self.sampler_model(), self.tokenizer, self.eval_tasks, self.config, pool=pool,
                           mesh=self.mesh, seed=self.config.experiment.seed)
        return eval_metrics(results)

    def sampler_model(self) -> Decoder:
        return nnx.merge(self.graphdef, self.params)

    def run(self, *, resume: bool = False, on_step: Callable[[dict], None] | None = None,
            on_phase: Callable[[str], None] | None = None) -> list[dict]:
        """Runs to `rl.steps`. `on_step` gets each step's metrics, `on_phase` the name of each phase
        as it starts (rollout, reward, value, update: the `*_s` timings; eval, checkpoint): both on
        process 0 only."""
        rl = self.config.rl
        return self.loop.run(self, steps=rl.steps, save_every=rl.save_every,
                             eval_every=rl.eval_every if self.eval_tasks else 0, resume=resume,
                             resources=lambda: RewardPool(num_workers=rl.reward_workers),
                             on_step=on_step, on_phase=on_phase)


def _select_rows(all_rows: StepRows, keep: np.ndarray, batch_size: int) -> StepRows:
    """The kept candidate rows, padded to a multiple of the batch with rows that train nothing.

    Row weights make every update the mean over its real rows: in the last, partly padded batch
    of n real rows the real rows weigh batch_size / n and padding rows 0.
    """
    kept = np.flatnonzero(keep)
    total = round_up(len(kept), batch_size)
    source = np.concatenate([kept, np.full(total - len(kept), kept[0])])
    rows = jax.tree.map(lambda x: np.asarray(x)[source], all_rows.rows)
    weights = np.ones(total, np.float32)
    last_real = len(kept) - (total - batch_size)
    weights[total - batch_size:] = np.where(np.arange(batch_size) < last_real, batch_size / last_real, 0.0)
    loss_mask = rows.loss_mask.copy()
    loss_mask[len(kept):] = False
    rows = dataclasses.replace(rows, weights=weights, loss_mask=loss_mask)
    return StepRows(rows=rows, response=all_rows.response[source], rounds=[all_rows.rounds[i] for i in kept],
                    num_real=len(kept), source=source)

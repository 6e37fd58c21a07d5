"""What SFT and RL updates share: token log-probs of the noisy copy, the optimizer, and one
compiled update step with gradient accumulation over micro-batches.

The step is a pure function `(params, opt_state, rows, extra) -> (params, opt_state, metrics)`,
jitted once per row shape with params and optimizer state donated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tradojax.config import TrainConfig
from tradojax.training.rows import RowLayout, Rows

LossFn = Callable[[nnx.Module, Rows, Any], tuple[jax.Array, dict[str, jax.Array]]]


def noisy_token_logprobs(model: nnx.Module, rows: Rows, *, with_entropy: bool = False):
    """[B, L1] float32: log p(target_j) at each noisy response position, under the rows' layout
    (dual stream: the block-diffusion training mask; single stream: the full mask); with
    `with_entropy`, also the entropy (nats) of the predicted distribution at each position.

    The noisy response is the last L1 columns in both layouts; only those hidden states go through
    the LM head. Dream's logits are shifted (the logit at position i predicts token i+1, spec 1.5),
    so its response token j is read one column earlier.
    """
    response_length = rows.targets.shape[1]
    hidden = model.hidden_states(rows.tokens, rows.positions, rows.segments, rows.layout.mask_rule)
    start = rows.tokens.shape[1] - response_length
    if model.config.logits_shifted:
        if rows.layout is not RowLayout.SINGLE_STREAM:
            raise ValueError(f"a {model.config.family!r} model (shifted logits) trains on single-stream rows")
        start -= 1
    logits = model.hidden_to_logits(hidden[:, start:start + response_length])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target_logp = jnp.take_along_axis(log_probs, rows.targets[..., None], axis=-1)[..., 0]
    if not with_entropy:
        return target_logp
    return target_logp, -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def masked_normaliser(rows: Rows, normalization: str) -> jax.Array:
    """Per-row divisor: the padded response length L1 (the original) or the trained-token count."""
    if normalization == "padded_length":
        return jnp.full(rows.loss_mask.shape[:1], rows.loss_mask.shape[1], jnp.float32)
    return jnp.maximum(rows.loss_mask.sum(axis=1), 1).astype(jnp.float32)


def sft_loss(model: nnx.Module, rows: Rows, extra: Any, *, normalization: str = "padded_length"):
    """−(1/B) Σ_rows w_r (1/L1) Σ_masked log p(y_j) (spec section 5). With `normalization="tokens"`
    each row is divided by its trained-token count instead of L1 (the original's LLaDA/Dream rule)."""
    del extra
    logp = noisy_token_logprobs(model, rows)
    mask = rows.loss_mask.astype(jnp.float32)
    per_row = -(logp * mask).sum(axis=1) / masked_normaliser(rows, normalization)
    loss = jnp.mean(per_row * rows.weights)
    tokens = mask.sum()
    return loss, {"loss": loss, "nll_per_token": -(logp * mask).sum() / jnp.maximum(tokens, 1), "tokens": tokens}


def make_schedule(config: TrainConfig) -> optax.Schedule:
    peak, floor = config.learning_rate, config.learning_rate * config.min_lr_ratio
    decay_steps = max(config.steps - config.warmup_steps, 1)
    if config.schedule == "constant":
        decay = optax.constant_schedule(peak)
    elif config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.min_lr_ratio)
    else:
        decay = optax.linear_schedule(peak, floor, decay_steps)
    if config.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, config.warmup_steps)
    return optax.join_schedules([warmup, decay], [config.warmup_steps])


def make_optimizer(config: TrainConfig, learning_rate: float | None = None, *,
                   host_learning_rate: bool = False) -> optax.GradientTransformation:
    """AdamW with the schedule and global-norm clipping; moments are kept in float32.

    With `host_learning_rate` there is no schedule: the learning rate is a value in the optimizer
    state that the caller sets before each update (`with_learning_rate`), without recompiling.
    """
    if learning_rate is not None:
        config = dataclasses.replace(config, learning_rate=learning_rate)
    parts = []
    if config.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mu_dtype",)) if host_learning_rate else optax.adamw
    parts.append(adamw(config.learning_rate if host_learning_rate else make_schedule(config), b1=config.b1,
                       b2=config.b2, eps=config.eps, weight_decay=config.weight_decay, mu_dtype=jnp.float32))
    return optax.chain(*parts)


def with_learning_rate(opt_state: tuple, value: float) -> tuple:
    """The state of a `make_optimizer(..., host_learning_rate=True)` optimizer, learning rate set to `value`."""
    def set_rate(state):
        if not isinstance(state, optax.InjectStatefulHyperparamsState):
            return state
        rate = state.hyperparams["learning_rate"]
        return state._replace(hyperparams={**state.hyperparams,
                                           "learning_rate": jnp.asarray(value, rate.dtype)})

    return tuple(set_rate(state) for state in opt_state)


def within_step_cosine(peak: float, num_updates: int) -> np.ndarray:
    """The original's per-RL-step learning rates (spec 3.6): a half-cosine from `peak` towards 0
    over a horizon of `num_updates + 1` (update u uses peak * (1 + cos(pi u / horizon)) / 2)."""
    horizon = num_updates + 1
    return peak * 0.5 * (1 + np.cos(np.pi * np.arange(num_updates) / horizon))


def split_micro_batches(tree: Any, num_micro: int) -> Any:
    """[B, ...] leaves -> [num_micro, B / num_micro, ...]."""
    def split(x):
        x = jnp.asarray(x)
        if x.shape[0] % num_micro:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {num_micro} micro-batches")
        return x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:])

    return jax.tree.map(split, tree)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss_fn: LossFn,
                    num_micro_batches: int = 1) -> Callable:
    """The compiled update: mean gradient over micro-batches (lax.scan), one optimizer update.

    Returns jitted `step(params, opt_state, rows, extra) -> (params, opt_state, metrics)`;
    params and opt_state are donated. `extra` carries per-row arrays a loss needs (e.g. old
    log-probs, advantages) and is split into micro-batches like the rows.
    """

    def micro_loss(params, rows, extra):
        return loss_fn(nnx.merge(graphdef, params), rows, extra)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, rows: Rows, extra: Any = None):
        micro_rows = split_micro_batches(rows, num_micro_batches)
        micro_extra = split_micro_batches(extra, num_micro_batches) if extra is not None else None

        def accumulate(grads_sum, inputs):
            mb_rows, mb_extra = inputs
            (_, metrics), grads = grad_fn(params, mb_rows, mb_extra)
            return jax.tree.map(jnp.add, grads_sum, grads), metrics

        # metrics come out stacked per micro-batch: the loss is traced once (a zero metrics carry
        # would need its shapes, i.e. a second trace of the whole gradient)
        zero_grads = jax.tree.map(jnp.zeros_like, params)
        grads, metrics = jax.lax.scan(accumulate, zero_grads, (micro_rows, micro_extra))
        grads = jax.tree.map(lambda g: g / num_micro_batches, grads)
        metrics = jax.tree.map(lambda m: jnp.sum(m, axis=0) / num_micro_batches, metrics)
        metrics["grad_norm"] = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, metrics

    return step


_PINNED: dict[tuple, Callable] = {}


def pin_layouts(step_fn: Callable, params: Any, opt_state: Any, mesh: Mesh) -> Callable:
    """`step_fn` (a `make_train_step` update) with its outputs pinned to the inputs' layouts on
    `mesh`: left to propagation, XLA moves some parameters (e.g. norm scales) onto other mesh axes
    after the first step. Cached, so trainers with the same layouts share one compiled update."""
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    opt_shardings = jax.tree.map(lambda x: x.sharding, opt_state)
    key = (step_fn, mesh, jax.tree.structure(params), tuple(jax.tree.leaves(param_shardings)),
           jax.tree.structure(opt_state), tuple(jax.tree.leaves(opt_shardings)))
    if key not in _PINNED:
        replicated = NamedSharding(mesh, PartitionSpec())
        _PINNED[key] = jax.jit(step_fn, out_shardings=(param_shardings, opt_shardings, replicated),
                               donate_argnums=(0, 1))
    return _PINNED[key]

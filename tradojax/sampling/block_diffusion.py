"""The block-diffusion rollout engine (SDAR/TraDo; spec sections 2.1-2.5).

Decoding, per sequence (sequences never interact, so a batch decodes row by row exactly as each
prompt would alone):
  1. **Prefill** the prompt's complete blocks, `floor(P/b)*b` tokens, into the KV cache (sequence
     i's token at position t sits at cache slot t; blocks are aligned to the sequence's own first
     prompt token). The `P mod b` residual prompt tokens open the first block, followed by masks;
     they are context, never changed and never part of the output.
  2. **Denoise** the current block: one forward of its b tokens against the cache (bidirectional
     inside the block), one proposal per position (`strategies.sample_tokens`), the remasking
     strategy picks which masked positions to commit (`strategies.select_transfer`), at most
     `denoising_steps` steps (every strategy here finishes a block within them).
  3. **Commit** the finished block (JetEngine's `commit_block`): walk its completion positions left
     to right; an EOS or stop token is appended and ends the sequence; the output never exceeds
     `max_new_tokens`. A sequence that goes on spends one more forward on the block (the *save*
     pass) that writes the block's final K/V into the cache, then starts a fresh block of masks.

Scheduling follows the JetEngine: every loop iteration is one batched forward in which each
sequence is either denoising its block or saving it, independently of the others, so a sequence
that finishes its block early does not wait for the slowest one. The forward always writes the
block's K/V at slots [length, length + b); only saving sequences advance `length`, and a denoising
sequence's write lands beyond its committed length where nothing reads it (as the original's
`flash_attn_with_kvcache` call does). Finished sequences take no step, attend to an empty cache
(so a length-aware attention kernel does no work for them; their ignored K/V write lands in slots
[0, b)), and the loop exits when every sequence is done.

Differences from the original, all output-preserving or fixes of spec section 10:
  * selection never touches prompt-residual or decoded positions (10.11), ties are broken by
    position (10.14), entropy_bounded finishes every block (10.12): see `strategies`;
  * stop tokens in the prompt residual are ignored (10.15), and a stop token beyond the
    `max_new_tokens` cap is not appended (`commit_block`);
  * a block whose outcome is already fixed (an unmasked stop token, or the cap, before any
    remaining mask) is committed at once instead of denoising masks that would be dropped, and a
    sequence's last block gets no save pass (its K/V would never be read). Tokens and traces are
    unchanged; forwards are saved.

Trace: for every output token, the sequence's global 1-based denoising step at which it was
unmasked (spec 2.4 `step_map`: only denoising forwards count, not prefill or save passes). The
sampler's log-prob of each token (under the filtered distribution it was drawn from) comes too.

Randomness: sequence i draws from `fold_in(fold_in(rng, i), global_step)`, so its draws do not
depend on the batch size, on sharding, or on what other sequences do.

The mask token is never proposed (its logit is set to -inf before filtering): a committed token
equal to `<|MASK|>` would be indistinguishable from a mask for the model and for the trainer.

Compiled pieces: `_start` (prefill + group broadcast + first blocks) and `_decode` (the
`lax.while_loop`, with the decode state donated), one compile each per (batch, prompt bucket,
max_new_tokens) and sampling shape. `_decode` takes an iteration limit as a traced argument, so a
caller can run it in chunks (for a progress bar) without recompiling.

An uncached reference mode (`cached=False`) recomputes the whole canvas (prompt + committed blocks
+ current block) with the model's full forward under the dense block-causal mask at every step;
it must produce the same tokens and traces (tests) and is the baseline of `benchmarks/rollout.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tradojax.config import ConfigError, ModelConfig, SamplingConfig
from tradojax.models.transformer import DTYPES, Decoder, KVCache
from tradojax.ops.masks import MaskRule, inference_segments
from tradojax.sampling import strategies

DENOISING, SAVING, DONE = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Public results
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rollout:
    """Generated responses, row r answering prompt `prompt_index[r]` (rows of a prompt are adjacent).

    Arrays are [N, max_new_tokens] (or [N]); entries at and beyond `lengths[r]` are padding
    (`pad_token_id` in `tokens`, 0 in `trace` and `logprobs`).
    """

    tokens: Any  # int32 [N, G]: generated ids, including a final EOS/stop token
    lengths: Any  # int32 [N]
    trace: Any  # int32 [N, G]: global 1-based denoising step at which each token was unmasked
    logprobs: Any  # float32 [N, G]: sampler log-prob of each token under the filtered distribution
    hit_stop: Any  # bool [N]: ended with EOS or a stop token (else at max_new_tokens)
    num_steps: Any  # int32 [N]: denoising steps spent by each row
    prompt_index: Any  # int32 [N]
    prompt_lengths: Any  # int32 [N]
    num_forwards: int  # batched decode forwards (each b tokens per row cached, the canvas uncached)
    prefill_forwards: int  # batched prefill forwards (0 uncached)

    def to_numpy(self) -> Rollout:
        """The same rollout with every array as a numpy array (the whole batch, on every host)."""
        from tradojax.parallel.sharding import to_host

        return dataclasses.replace(
            self, **{f.name: to_host(getattr(self, f.name)) for f in dataclasses.fields(self)
                     if f.name not in ("num_forwards", "prefill_forwards")})

    def responses(self) -> list[list[int]]:
        """The generated ids of every row, without padding."""
        tokens, lengths = np.asarray(self.tokens), np.asarray(self.lengths)
        return [tokens[r, : lengths[r]].tolist() for r in range(tokens.shape[0])]

    @property
    def num_generated(self) -> int:
        return int(np.asarray(self.lengths).sum())


@dataclasses.dataclass(frozen=True)
class Progress:
    """What a progress callback receives after every compiled chunk."""

    rows_done: int
    rows_total: int
    tokens_generated: int
    tokens_budget: int  # rows_total * max_new_tokens
    forwards: int


# ----------------------------------------------------------------------------------------------
# Compiled state
# ----------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything the decode loop carries; rows are sequences (batch axis 0, or 1 for k/v)."""

    k: jax.Array | None  # [layers, N, S, Hkv, D] (cached mode)
    v: jax.Array | None
    canvas: jax.Array | None  # [N, S] token ids (uncached mode)
    length: jax.Array  # [N] committed tokens (cache slots / canvas prefix in use)
    block_tokens: jax.Array  # [N, b]
    masked: jax.Array  # [N, b] bool: still a mask
    block_trace: jax.Array  # [N, b] int32
    block_logprob: jax.Array  # [N, b] float32
    prompt_count: jax.Array  # [N] leading prompt-residual positions of the current block
    step_in_block: jax.Array  # [N]
    global_step: jax.Array  # [N]
    phase: jax.Array  # [N]: DENOISING, SAVING or DONE
    out_tokens: jax.Array  # [N, G + b] (b spare columns so a block write never clips)
    out_trace: jax.Array
    out_logprob: jax.Array
    out_len: jax.Array  # [N]
    hit_stop: jax.Array  # [N] bool
    row_keys: jax.Array  # [N] typed PRNG keys
    num_forwards: jax.Array  # [] int32


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The static (shape- and branch-deciding) part of a decode; hashable for jit."""

    block_size: int
    steps: int
    top_k: int
    use_top_p: bool
    strategy: str
    slots: int
    max_new_tokens: int
    cached: bool
    mask_id: int
    pad_id: int
    batch_axes: tuple[str, ...]
    mesh: Mesh | None

    def layout_only(self) -> _Plan:
        """This plan with the sampling choices blanked: `_start` does not depend on them, so one
        compiled start serves every strategy and filter."""
        return dataclasses.replace(self, steps=1, top_k=0, use_top_p=False, strategy="")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Knobs:
    """The traced sampling parameters (changing them does not recompile)."""

    temperature: jax.Array
    top_p: jax.Array
    dynamic_threshold: jax.Array
    eb_threshold: jax.Array
    stop_ids: jax.Array  # [K] int32: EOS, the stop tokens, then -1 up to a multiple of 8 (fewer shapes)


def _constrain(x: jax.Array | None, plan: _Plan, batch_axis: int = 0):
    if x is None or plan.mesh is None or not plan.batch_axes:
        return x
    spec = [None] * x.ndim
    spec[batch_axis] = plan.batch_axes
    return jax.lax.with_sharding_constraint(x, NamedSharding(plan.mesh, PartitionSpec(*spec)))


def _constrain_state(state: DecodeState, plan: _Plan) -> DecodeState:
    fields = {}
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        if f.name == "num_forwards":
            fields[f.name] = value
        else:
            fields[f.name] = _constrain(value, plan, 1 if f.name in ("k", "v") else 0)
    return DecodeState(**fields)


def _per_row(fn: Callable, *args):
    """vmap over rows (axis 0 of every argument)."""
    return jax.vmap(fn)(*args)


def _start(graphdef: nnx.GraphDef, params: nnx.State, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
           active: jax.Array, rng: jax.Array, plan: _Plan, num_samples: int) -> DecodeState:
    """Prefill each prompt once, broadcast to `num_samples` rows, and open every row's first block."""
    model: Decoder = nnx.merge(graphdef, params)
    b, n = plan.block_size, num_samples
    num_prompts, bucket = prompt_tokens.shape
    prefill_len = (prompt_lengths // b) * b
    residual = prompt_lengths - prefill_len
    position = jnp.arange(b, dtype=jnp.int32)
    padded = jnp.pad(prompt_tokens, ((0, 0), (0, b)), constant_values=plan.pad_id)
    residual_tokens = jnp.take_along_axis(padded, prefill_len[:, None] + position[None, :], axis=1)
    is_prompt = position[None, :] < residual[:, None]
    first_block = jnp.where(is_prompt, residual_tokens, plan.mask_id).astype(jnp.int32)

    def rows(x):  # per prompt -> per row
        return jnp.repeat(x, n, axis=0, total_repeat_length=num_prompts * n)

    k = v = canvas = None
    extra = plan.slots - bucket
    if plan.cached:
        cache = KVCache.zeros(model.config, num_prompts, bucket)
        cache = model.prefill(prompt_tokens, prefill_len, cache, b)
        widen = ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0))
        k = jnp.pad(jnp.repeat(cache.k, n, axis=1, total_repeat_length=num_prompts * n), widen)
        v = jnp.pad(jnp.repeat(cache.v, n, axis=1, total_repeat_length=num_prompts * n), widen)
    else:
        canvas = rows(jnp.pad(prompt_tokens, ((0, 0), (0, extra)), constant_values=plan.pad_id))
    num_rows = num_prompts * n
    width = plan.max_new_tokens + b
    state = DecodeState(
        k=k, v=v, canvas=canvas,
        length=rows(prefill_len).astype(jnp.int32),
        block_tokens=rows(first_block),
        masked=rows(~is_prompt),
        block_trace=jnp.zeros((num_rows, b), jnp.int32),
        block_logprob=jnp.zeros((num_rows, b), jnp.float32),
        prompt_count=rows(residual).astype(jnp.int32),
        step_in_block=jnp.zeros((num_rows,), jnp.int32),
        global_step=jnp.zeros((num_rows,), jnp.int32),
        phase=jnp.where(rows(active), DENOISING, DONE).astype(jnp.int32),
        out_tokens=jnp.full((num_rows, width), plan.pad_id, jnp.int32),
        out_trace=jnp.zeros((num_rows, width), jnp.int32),
        out_logprob=jnp.zeros((num_rows, width), jnp.float32),
        out_len=jnp.zeros((num_rows,), jnp.int32),
        hit_stop=jnp.zeros((num_rows,), bool),
        row_keys=jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(num_rows)),
        num_forwards=jnp.zeros((), jnp.int32),
    )
    return _constrain_state(state, plan)


def _block_logits_uncached(model: Decoder, state: DecodeState, plan: _Plan) -> jax.Array:
    """Full recompute: the canvas with the current block at [length, length + b), block-causal."""
    b = plan.block_size
    tokens = _per_row(lambda row, block, start: jax.lax.dynamic_update_slice_in_dim(row, block, start, 0),
                      state.canvas, state.block_tokens, state.length)
    num_rows, slots = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (num_rows, slots))
    valid = positions < (state.length + b)[:, None]
    segments = inference_segments(positions, valid, b)
    hidden = model.hidden_states(tokens, positions, segments, MaskRule.BLOCK_DIFFUSION)
    # Only the current block's logits are used: skip the LM head elsewhere (same values).
    block_hidden = _per_row(lambda h, start: jax.lax.dynamic_slice_in_dim(h, start, b, 0), hidden, state.length)
    return model.hidden_to_logits(block_hidden)


def block_decided(block_tokens: jax.Array, masked: jax.Array, prompt_count: jax.Array, out_len: jax.Array,
                  stop_ids: jax.Array, max_new_tokens: int) -> jax.Array:
    """[N] bool: the sequence's end is already fixed by this block, masks or not.

    True when, walking the completion positions left to right, an unmasked stop token or the
    `max_new_tokens` cap comes before any masked position. The remaining masks could only fill
    positions that `commit_block` drops, so the block is committed at once (the original keeps
    denoising them; outputs and traces are the same, the forwards are saved).
    """
    b = block_tokens.shape[-1]
    position = jnp.arange(b, dtype=jnp.int32)[None, :]
    source = position + prompt_count[:, None]
    in_block = source < b
    source = jnp.minimum(source, b - 1)
    tokens = jnp.take_along_axis(block_tokens, source, axis=1)
    still_masked = in_block & jnp.take_along_axis(masked, source, axis=1)
    capped = out_len[:, None] + position >= max_new_tokens
    is_stop = in_block & ~still_masked & jnp.any(tokens[:, :, None] == stop_ids[None, None, :], axis=-1)
    blocker = still_masked & ~capped
    terminal = (in_block & capped) | is_stop
    blocked_before = (jnp.cumsum(blocker, axis=1) - blocker) > 0
    return jnp.any(terminal & ~blocked_before, axis=1)


def commit_block(
    block_tokens: jax.Array,
    block_trace: jax.Array,
    block_logprob: jax.Array,
    prompt_count: jax.Array,
    complete: jax.Array,
    out_tokens: jax.Array,
    out_trace: jax.Array,
    out_logprob: jax.Array,
    out_len: jax.Array,
    stop_ids: jax.Array,
    max_new_tokens: int,
    pad_id: int,
):
    """Appends the completion part of every complete block to the outputs (JetEngine commit_block).

    Walking the block's completion positions (after the `prompt_count` residual prompt tokens)
    left to right: stop once the output holds `max_new_tokens` tokens; append the token; an EOS or
    stop token (`stop_ids`) ends the sequence after being appended. Differences from the original
    (spec 10.15 and the cap order): prompt-residual tokens are never checked for stop tokens, and a
    stop token beyond the cap is not appended (the original could return max_tokens + 1 tokens).

    Returns (out_tokens, out_trace, out_logprob, out_len, hit_stop [N], finished [N]); rows that
    are not `complete` are unchanged and not finished.
    """
    b = block_tokens.shape[-1]
    position = jnp.arange(b, dtype=jnp.int32)[None, :]
    source = position + prompt_count[:, None]  # completion token j of the block sits at j + prompt_count
    in_block = source < b
    source = jnp.minimum(source, b - 1)
    tokens = jnp.take_along_axis(block_tokens, source, axis=1)
    trace = jnp.take_along_axis(block_trace, source, axis=1)
    logprob = jnp.take_along_axis(block_logprob, source, axis=1)
    is_stop = in_block & jnp.any(tokens[:, :, None] == stop_ids[None, None, :], axis=-1)
    stopped_before = (jnp.cumsum(is_stop, axis=1) - is_stop) > 0
    appended = complete[:, None] & in_block & ~stopped_before & (out_len[:, None] + position < max_new_tokens)
    new_len = out_len + jnp.sum(appended, axis=1, dtype=jnp.int32)
    hit_stop = jnp.any(appended & is_stop, axis=1)
    finished = complete & (hit_stop | (new_len >= max_new_tokens))

    def write(buffer, values, fill):
        values = jnp.where(appended, values, fill).astype(buffer.dtype)
        return _per_row(lambda row, vals, start: jax.lax.dynamic_update_slice_in_dim(row, vals, start, 0),
                        buffer, values, out_len)

    # Slots [out_len, out_len + b) hold padding before the write, so `fill` keeps them unchanged.
    return (write(out_tokens, tokens, pad_id), write(out_trace, trace, 0), write(out_logprob, logprob, 0.0),
            new_len, hit_stop, finished)


def _iteration(model: Decoder, state: DecodeState, knobs: _Knobs, plan: _Plan) -> DecodeState:
    """One batched forward: denoising rows take a step, saving rows commit their block's K/V."""
    b = plan.block_size
    denoising = state.phase == DENOISING
    saving = state.phase == SAVING
    done = state.phase == DONE
    k, v, canvas, length = state.k, state.v, state.canvas, state.length

    if plan.cached:
        # Finished rows attend to an empty cache; their (ignored) write goes to slots [0, b).
        attend = KVCache(k, v, jnp.where(done, 0, length))
        logits, written = model.decode_block(state.block_tokens, attend, commit=True)
        k, v = written.k, written.v
        length = jnp.where(saving, length + b, length)
    else:
        logits = _block_logits_uncached(model, state, plan)
    logits = logits.at[..., plan.mask_id].set(-jnp.inf)

    step_keys = jax.vmap(jax.random.fold_in)(state.row_keys, state.global_step)
    propose = functools.partial(
        strategies.sample_tokens, temperature=knobs.temperature, top_k=plan.top_k, top_p=knobs.top_p,
        use_top_p=plan.use_top_p, with_entropy=plan.strategy == "entropy_bounded")
    proposal = jax.vmap(propose)(logits, step_keys)
    schedule = jnp.asarray(strategies.transfer_schedule(b, plan.steps))
    quota = schedule[jnp.minimum(state.step_in_block, plan.steps - 1)]
    transfer = strategies.select_transfer(
        plan.strategy, state.masked & denoising[:, None], proposal, quota,
        dynamic_threshold=knobs.dynamic_threshold, eb_threshold=knobs.eb_threshold)

    block_tokens = jnp.where(transfer, proposal.tokens, state.block_tokens)
    block_logprob = jnp.where(transfer, proposal.logprob, state.block_logprob)
    block_trace = jnp.where(transfer, state.global_step[:, None] + 1, state.block_trace)
    masked = state.masked & ~transfer
    step_in_block = state.step_in_block + denoising
    global_step = state.global_step + denoising
    decided = block_decided(block_tokens, masked, state.prompt_count, state.out_len, knobs.stop_ids,
                            plan.max_new_tokens)
    complete = denoising & (~jnp.any(masked, axis=1) | (step_in_block >= plan.steps) | decided)

    out_tokens, out_trace, out_logprob, out_len, hit_now, finished = commit_block(
        block_tokens, block_trace, block_logprob, state.prompt_count, complete,
        state.out_tokens, state.out_trace, state.out_logprob, state.out_len,
        knobs.stop_ids, plan.max_new_tokens, plan.pad_id)
    continues = complete & ~finished

    if plan.cached:
        new_block = saving  # their K/V went in with this forward
        phase = jnp.where(complete, jnp.where(finished, DONE, SAVING), jnp.where(saving, DENOISING, state.phase))
    else:  # the canvas takes the block at once: no save pass
        new_block = continues
        canvas = jnp.where(
            continues[:, None],
            _per_row(lambda row, block, start: jax.lax.dynamic_update_slice_in_dim(row, block, start, 0),
                     canvas, block_tokens, length),
            canvas)
        length = jnp.where(continues, length + b, length)
        phase = jnp.where(complete & finished, DONE, state.phase)

    fresh = new_block[:, None]
    new_state = DecodeState(
        k=k, v=v, canvas=canvas, length=length,
        block_tokens=jnp.where(fresh, plan.mask_id, block_tokens),
        masked=jnp.where(fresh, True, masked),
        block_trace=jnp.where(fresh, 0, block_trace),
        block_logprob=jnp.where(fresh, 0.0, block_logprob),
        prompt_count=jnp.where(new_block, 0, state.prompt_count),
        step_in_block=jnp.where(new_block, 0, step_in_block),
        global_step=global_step,
        phase=phase.astype(jnp.int32),
        out_tokens=out_tokens, out_trace=out_trace, out_logprob=out_logprob, out_len=out_len,
        hit_stop=state.hit_stop | hit_now,
        row_keys=state.row_keys,
        num_forwards=state.num_forwards + 1,
    )
    return _constrain_state(new_state, plan)


def _decode(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, knobs: _Knobs,
            limit: jax.Array, plan: _Plan) -> tuple[DecodeState, jax.Array]:
    """Runs iterations until every row is done or `limit` iterations have run.

    Also returns a replicated int32 summary [rows done, tokens generated, forwards] that every host
    can read without gathering the sharded state."""
    model: Decoder = nnx.merge(graphdef, params)

    def cond(carry):
        iteration, s = carry
        return (iteration < limit) & jnp.any(s.phase != DONE)

    def body(carry):
        iteration, s = carry
        return iteration + 1, _iteration(model, s, knobs, plan)

    _, state = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))
    summary = jnp.stack([jnp.sum(state.phase == DONE, dtype=jnp.int32), jnp.sum(state.out_len, dtype=jnp.int32),
                         state.num_forwards])
    return state, _replicated(summary, plan)


def _replicated(x: jax.Array, plan: _Plan) -> jax.Array:
    if plan.mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(plan.mesh, PartitionSpec()))


def _outputs(state: DecodeState, plan: _Plan, rows: int) -> dict[str, jax.Array]:
    """The rollout arrays of the first `rows` rows, replicated (readable on every host)."""
    g = plan.max_new_tokens
    arrays = {"tokens": state.out_tokens[:rows, :g], "lengths": state.out_len[:rows],
              "trace": state.out_trace[:rows, :g], "logprobs": state.out_logprob[:rows, :g],
              "hit_stop": state.hit_stop[:rows], "num_steps": state.global_step[:rows]}
    return {name: _replicated(value, plan) for name, value in arrays.items()}


_start_jit = jax.jit(_start, static_argnames=("graphdef", "plan", "num_samples"))
_decode_jit = jax.jit(_decode, static_argnames=("graphdef", "plan"), donate_argnames=("state",))
_outputs_jit = jax.jit(_outputs, static_argnames=("plan", "rows"))


# ----------------------------------------------------------------------------------------------
# Host side: validation, buckets, the sampler
# ----------------------------------------------------------------------------------------------


def check_sampling(sampling: SamplingConfig, model_config: ModelConfig) -> None:
    """Raises ConfigError (naming the field) for parameters the engine cannot run with.

    SamplingConfig validates itself on construction; this repeats the checks that matter here so
    that an instance built around validation (e.g. `object.__setattr__`) still fails clearly.
    """
    if sampling.block_size < 1:
        raise ConfigError(f"sampling.block_size: must be >= 1, got {sampling.block_size}")
    if not 1 <= sampling.denoising_steps <= sampling.block_size:
        raise ConfigError(f"sampling.denoising_steps: must be in [1, block_size={sampling.block_size}], "
                          f"got {sampling.denoising_steps}")
    if not 0 <= sampling.dynamic_threshold <= 1:
        raise ConfigError(f"sampling.dynamic_threshold: must be in [0, 1], got {sampling.dynamic_threshold}")
    if sampling.remasking_strategy not in strategies.STRATEGIES:
        raise ConfigError(f"sampling.remasking_strategy: must be one of {list(strategies.STRATEGIES)}, "
                          f"got {sampling.remasking_strategy!r}")
    if sampling.temperature <= 0:
        raise ConfigError(f"sampling.temperature: must be > 0 (use top_k=1 for greedy), got {sampling.temperature}")
    if not 0 < sampling.top_p <= 1:
        raise ConfigError(f"sampling.top_p: must be in (0, 1], got {sampling.top_p}")
    if sampling.top_k < 0:
        raise ConfigError(f"sampling.top_k: must be >= 0, got {sampling.top_k}")
    if sampling.max_new_tokens < 1:
        raise ConfigError(f"sampling.max_new_tokens: must be >= 1, got {sampling.max_new_tokens}")
    if sampling.num_samples < 1:
        raise ConfigError(f"sampling.num_samples: must be >= 1, got {sampling.num_samples}")
    for i, token in enumerate(sampling.stop_token_ids):
        if not 0 <= token < model_config.vocab_size:
            raise ConfigError(f"sampling.stop_token_ids[{i}]: {token} is not in [0, vocab_size={model_config.vocab_size})")
    if model_config.family != "sdar":
        raise ConfigError(f"model.family: the block-diffusion sampler serves 'sdar' models, got {model_config.family!r}")


def check_prompts(prompts: Sequence[Sequence[int]], sampling: SamplingConfig, model_config: ModelConfig) -> list[np.ndarray]:
    """Validates prompts (token-id sequences) and returns them as int32 arrays."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Sequence, np.ndarray)):
        raise TypeError(f"prompts must be a sequence of token-id sequences, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts: no prompts given")
    context = model_config.max_position_embeddings
    arrays = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] is a string; tokenize it first (the sampler takes token ids)")
        ids = np.asarray(prompt)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise TypeError(f"prompts[{i}] must be a 1-D sequence of ints, got dtype {ids.dtype} shape {ids.shape}")
        if ids.size == 0:
            raise ValueError(f"prompts[{i}] is empty")
        bad = (ids < 0) | (ids >= model_config.vocab_size)
        if bad.any():
            j = int(np.argmax(bad))
            raise ValueError(f"prompts[{i}][{j}] = {int(ids[j])} is not a token id in [0, vocab_size={model_config.vocab_size})")
        if ids.size + sampling.max_new_tokens > context:
            raise ValueError(
                f"prompts[{i}] has {ids.size} tokens; with sampling.max_new_tokens={sampling.max_new_tokens} it "
                f"needs {ids.size + sampling.max_new_tokens} positions, more than the context "
                f"(model.max_position_embeddings={context})")
        arrays.append(ids.astype(np.int32))
    return arrays


def prompt_bucket(longest: int, buckets: Sequence[int]) -> int:
    """The padded prompt width: the smallest bucket >= `longest`, else a multiple of the largest."""
    for bucket in sorted(buckets):
        if bucket >= longest:
            return int(bucket)
    largest = max(buckets)
    return int(math.ceil(longest / largest) * largest)


def cache_slots(bucket: int, block_size: int, max_new_tokens: int) -> int:
    """Slots per sequence: the prefilled blocks plus every block decoding may open (a prompt residual
    of up to b-1 tokens shares the first block) -- also the uncached canvas width."""
    blocks = -(-(max_new_tokens + block_size - 1) // block_size)
    return (bucket // block_size) * block_size + blocks * block_size


def rollout_params(params: nnx.State, config: ModelConfig) -> nnx.State:
    """The weights the sampler streams: with f32 master weights and a narrower compute dtype, the
    embedding, LM head and layer weights in the compute dtype. The model casts exactly these at use,
    so rollouts are bit-identical while each decode step reads half the bytes. The final norm stays
    as it is (the model does not cast it)."""
    compute = DTYPES[config.compute_dtype]
    if DTYPES[config.param_dtype] == compute:
        return params

    def cast(path, leaf):
        top = str(path[0].key if hasattr(path[0], "key") else path[0])
        return leaf.astype(compute) if top in ("layers", "embed_tokens", "lm_head") else leaf

    return jax.tree_util.tree_map_with_path(cast, params)


class BlockDiffusionSampler:
    """Generates responses from an SDAR/TraDo model with the cached (or reference) block sampler.

    Usage: `BlockDiffusionSampler(model, config.sampling).generate(prompt_ids, rng=0)`. For RL,
    pass the current parameters to each `generate(..., params=...)` call; compiled code is reused
    as long as the shapes (batch, prompt bucket, max_new_tokens) and static options do not change.
    """

    def __init__(self, model: Decoder, sampling: SamplingConfig, *, mesh: Mesh | None = None, cached: bool = True):
        self.model_config: ModelConfig = model.config
        check_sampling(sampling, self.model_config)
        self.sampling = sampling
        self.mesh = mesh
        self.cached = cached
        self.graphdef, self._model_params = nnx.split(model)
        self.batch_axes: tuple[str, ...] = ()
        self.data_parallel = 1
        if mesh is not None:
            self.batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
            self.data_parallel = math.prod(mesh.shape[a] for a in self.batch_axes)

    @functools.cached_property
    def params(self) -> nnx.State:
        """The model's own weights as the sampler streams them, placed on first use: a caller that
        always passes `generate(params=...)` (the RL loop) never holds this extra copy."""
        return self._place(self._model_params)

    def _place(self, params: nnx.State) -> nnx.State:
        params = rollout_params(params, self.model_config)
        if self.mesh is None:
            return params
        from tradojax.parallel.sharding import shard_params

        return shard_params(params, self.mesh, role="rollout")

    def _plan(self, bucket: int) -> _Plan:
        s = self.sampling
        return _Plan(
            block_size=s.block_size, steps=s.denoising_steps, top_k=s.top_k, use_top_p=s.top_p < 1.0,
            strategy=s.remasking_strategy,
            slots=cache_slots(bucket, s.block_size, s.max_new_tokens), max_new_tokens=s.max_new_tokens,
            cached=self.cached, mask_id=self.model_config.mask_token_id, pad_id=self.model_config.pad_token_id,
            batch_axes=self.batch_axes, mesh=self.mesh if self.batch_axes else None)

    def abstract_params(self) -> nnx.State:
        """The placed weights' shapes, dtypes and shardings (no memory): what `generate` streams."""
        abstract = jax.eval_shape(lambda p: rollout_params(p, self.model_config), self._model_params)
        if self.mesh is None:
            return abstract
        from tradojax.parallel.sharding import param_sharding

        def placed(path, leaf):
            sharding = param_sharding(".".join(str(p) for p in path), leaf.shape, self.mesh, role="rollout")
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

        return nnx.map_state(placed, abstract)

    def _abstract_rows(self, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
        """A per-row input as `place_rows` lays it out, without data."""
        if self.mesh is None:
            return jax.ShapeDtypeStruct(shape, dtype)
        spec = PartitionSpec(self.batch_axes or None, *([None] * (len(shape) - 1)))
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(self.mesh, spec))

    def _abstract_replicated(self, value: Any) -> Any:
        """A small input (scalar, key, knobs) as an abstract value, replicated over the mesh."""
        def one(x):
            x = jax.eval_shape(lambda: x) if not isinstance(x, jax.ShapeDtypeStruct) else x
            sharding = None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

        return jax.tree.map(one, value)

    def programs(self, rows: int, prompt_len: int) -> dict[str, tuple[Callable, tuple, dict]]:
        """Every jitted function `generate` runs for `rows` sequences with prompts padded to
        `prompt_len`, as {name: (jitted_fn, args, kwargs)} with abstract arguments (shapes, dtypes,
        and this sampler's shardings on its mesh; static arguments concrete), so that
        `fn.lower(*args, **kwargs).compile()` compiles exactly the program `generate` runs (for AOT
        memory and cost reports; works on a sampler built from `abstract_model`)."""
        s = self.sampling
        num_real = -(-rows // s.num_samples)
        num_prompts = -(-num_real // self.data_parallel) * self.data_parallel
        bucket = prompt_bucket(prompt_len, s.prompt_buckets)
        plan = self._plan(bucket)
        params = self.abstract_params()
        rng = self._abstract_replicated(jax.random.key(0))
        start_args = (self.graphdef, params, self._abstract_rows((num_prompts, bucket), jnp.int32),
                      self._abstract_rows((num_prompts,), jnp.int32), self._abstract_rows((num_prompts,), jnp.bool_),
                      rng, plan.layout_only(), s.num_samples)
        state = _start_jit.eval_shape(*start_args)
        state = self._abstract_state(state, plan)
        knobs = self._abstract_replicated(self._knobs())
        limit = self._abstract_replicated(jnp.int32(0))
        return {
            "start": (_start_jit, start_args, {}),
            "decode": (_decode_jit, (self.graphdef, params, state, knobs, limit, plan), {}),
            "outputs": (_outputs_jit, (state, plan, num_real * s.num_samples), {}),
        }

    def _abstract_state(self, state: DecodeState, plan: _Plan) -> DecodeState:
        """Attaches to every leaf of an abstract decode state the sharding `_constrain_state` gives it."""
        fields = {}
        for f in dataclasses.fields(state):
            leaf = getattr(state, f.name)
            if leaf is None:
                fields[f.name] = None
            elif self.mesh is None:
                fields[f.name] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
            elif f.name == "num_forwards" or plan.mesh is None:
                fields[f.name] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                      sharding=NamedSharding(self.mesh, PartitionSpec()))
            else:
                spec = [None] * leaf.ndim
                spec[1 if f.name in ("k", "v") else 0] = plan.batch_axes
                fields[f.name] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                      sharding=NamedSharding(self.mesh, PartitionSpec(*spec)))
        return DecodeState(**fields)

    def _knobs(self) -> _Knobs:
        s = self.sampling
        stop_list = (self.model_config.eos_token_id, *s.stop_token_ids)
        stop_ids = np.full((-(-len(stop_list) // 8) * 8,), -1, np.int32)
        stop_ids[: len(stop_list)] = stop_list
        return _Knobs(temperature=jnp.float32(s.temperature), top_p=jnp.float32(s.top_p),
                      dynamic_threshold=jnp.float32(s.dynamic_threshold),
                      eb_threshold=jnp.float32(s.eb_threshold), stop_ids=jnp.asarray(stop_ids))

    def _replicate(self, tree: Any) -> Any:
        """Small inputs (key, knobs, limits) committed replicated over the mesh, as `programs` says."""
        if self.mesh is None:
            return tree
        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))

    def max_iterations(self) -> int:
        """An upper bound on decode iterations (every row finishes within it)."""
        s = self.sampling
        blocks = -(-(s.max_new_tokens + s.block_size - 1) // s.block_size)
        return blocks * (s.denoising_steps + (1 if self.cached else 0))

    def place_rows(self, x: np.ndarray) -> jax.Array:
        """A per-row host array on the device(s): axis 0 split over the mesh's data axes."""
        if not self.batch_axes:
            return jnp.asarray(x)
        spec = PartitionSpec(self.batch_axes, *([None] * (x.ndim - 1)))
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        rng: jax.Array | int | None = None,
        params: nnx.State | None = None,
        progress: Callable[[Progress], None] | None = None,
        iterations_per_call: int | None = None,
    ) -> Rollout:
        """Samples `sampling.num_samples` responses per prompt (prompt-major rows).

        Args:
          prompts: token-id sequences of any lengths (no padding).
          rng: a PRNG key or an int seed (default: `sampling.seed`).
          params: parameters to use instead of the ones the sampler was built with (RL updates).
          progress: called after every compiled chunk with a `Progress`.
          iterations_per_call: decode iterations per compiled call (default: all at once); smaller
            values give a live progress bar at the cost of a host round trip per chunk.
        """
        s = self.sampling
        arrays = check_prompts(prompts, s, self.model_config)
        num_real = len(arrays)
        num_prompts = -(-num_real // self.data_parallel) * self.data_parallel
        bucket = prompt_bucket(max(a.size for a in arrays), s.prompt_buckets)
        plan = self._plan(bucket)
        tokens = np.full((num_prompts, bucket), self.model_config.pad_token_id, np.int32)
        lengths = np.ones((num_prompts,), np.int32)
        for i, ids in enumerate(arrays):
            tokens[i, : ids.size] = ids
            lengths[i] = ids.size
        tokens[num_real:] = tokens[0]  # padding prompts (for an even split over the mesh) start done
        lengths[num_real:] = lengths[0]
        active = np.arange(num_prompts) < num_real

        if rng is None:
            rng = s.seed
        if isinstance(rng, (int, np.integer)):
            rng = jax.random.key(int(rng))
        params = self.params if params is None else self._place(params)
        knobs = self._replicate(self._knobs())
        rng = self._replicate(rng)

        state = _start_jit(self.graphdef, params, self.place_rows(tokens), self.place_rows(lengths),
                           self.place_rows(active), rng, plan.layout_only(), s.num_samples)
        total_limit = self.max_iterations()
        chunk = total_limit if iterations_per_call is None else max(1, int(iterations_per_call))
        real_rows = num_real * s.num_samples
        padding_rows = (num_prompts - num_real) * s.num_samples  # done from the start
        while True:
            state, summary = _decode_jit(self.graphdef, params, state, knobs, self._replicate(jnp.int32(chunk)), plan)
            rows_done, tokens_generated, spent = (int(x) for x in np.asarray(summary))
            rows_done -= padding_rows
            if progress is not None:
                progress(Progress(rows_done=rows_done, rows_total=real_rows, tokens_generated=tokens_generated,
                                  tokens_budget=real_rows * s.max_new_tokens, forwards=spent))
            if rows_done == real_rows:
                break
            if spent >= total_limit:  # cannot happen: every strategy finishes a block in `steps` steps
                raise RuntimeError(f"decoding did not finish within {total_limit} iterations")
        outputs = _outputs_jit(state, plan, real_rows)
        return Rollout(
            **outputs,
            prompt_index=jnp.repeat(jnp.arange(num_real, dtype=jnp.int32), s.num_samples),
            prompt_lengths=jnp.repeat(jnp.asarray(lengths[:num_real]), s.num_samples),
            num_forwards=spent,
            prefill_forwards=1 if self.cached else 0,
        )


def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    *,
    rng: jax.Array | int | None = None,
    mesh: Mesh | None = None,
    cached: bool = True,
    progress: Callable[[Progress], None] | None = None,
    iterations_per_call: int | None = None,
) -> Rollout:
    """One-shot convenience: `BlockDiffusionSampler(model, sampling, ...).generate(prompts, ...)`."""
    sampler = BlockDiffusionSampler(model, sampling, mesh=mesh, cached=cached)
    return sampler.generate(prompts, rng=rng, progress=progress, iterations_per_call=iterations_per_call)

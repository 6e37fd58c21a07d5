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
     `max_new_tokens`. A sequence that goes on opens a fresh block of masks; the decided block's
     final K/V are written by the *next* forward (the fused save, below).

**Fused save.** The original spends one forward per block only to write the decided block's K/V
(the save pass: about half the forwards of greedy dynamic decoding). Here the next block's first
denoising forward carries both blocks, 2b tokens per sequence (`Decoder.fused_save_forward`):
the decided block at positions [length, length + b) sees the cache and itself, so its K/V are those
the save pass would write, and are written; the new block at [length + b, length + 2b) sees the
cache, the decided block and itself, so its logits are those of a forward after the save (block-
causal: the decided block never sees the new one). A sequence's last block is never saved. An
iteration where no sequence has a block to save runs the plain b-token forward (`lax.cond`), so at
batch 1 a block costs exactly its denoising steps. A fused iteration computes 2b tokens for every
resident sequence: free while decode is weight-bandwidth-bound (up to `_FUSE_ALWAYS_TOKENS` tokens
per forward it is taken whenever a block waits to be saved), twice the FLOPs when compute-bound;
there it is taken once at least half the resident sequences have a block to save, and the others'
saves wait an iteration (they take no step meanwhile, so results are unchanged and the cost is at
most the separate save pass's).

**Continuous batching (spec 2.4's `max_active`).** At most `sampling.max_active` sequences are
resident per data-parallel replica: the KV cache is [layers, replicas * max_active, slots, ...],
whatever the number of rows. Every loop iteration is one batched forward in which each resident
sequence takes a denoising step of its own block, independently of the others (a sequence that
finishes its block early does not wait). The compiled loop leaves when a replica has free slots
for `max(1, max_active // 8)` of its waiting rows (or all of them), and a compiled refill starts
rows in the free slots; the loop never leaves per token and nothing recompiles (shapes depend on
the row count and prompt bucket only). Prompts are prefilled into a *stage* (`Stage`, a few
prompts per replica) once each; a slot copies its prompt's prefilled cache from there, so the k
responses of a prompt share one prefill even when they start at different times. Committed
tokens go straight from the slots into the rollout arrays ([rows, max_new_tokens], 12 bytes per
token: the only state that grows with the rows). Results do not depend on `max_active`: every
row's draws come from its own key, and every row's forward sees only its own cache.

**Long responses: slots sized to `max_new_tokens`, not pages.** Each slot reserves
`bucket + max_new_tokens` cache positions. Paged KV (JetEngine's) would let a long-tailed batch
(responses differing 10x, up to 30k tokens) keep more sequences resident in the same memory,
because short responses would not hold their unused reservation: up to max/mean times the
concurrency, which is throughput while decode is weight-bandwidth-bound. It would also need a
paged attention kernel per backend, a page allocator and a policy for running out of pages
(JetEngine stalls; vLLM preempts). Slots keep memory exactly bounded (no allocator, no
preemption) and work with the existing kernels; the length-aware decode kernel reads only a
slot's live positions, so time follows the actual lengths and only capacity is lost. Pick
`max_active` from HBM / (per-token KV bytes x (bucket + max_new_tokens)); `tradojax aot` reports it.

Finished sequences take no step and attend to an empty cache (a length-aware attention kernel
does no work for them) until their slot is refilled; the loop exits when every row is done.

Differences from the original, all output-preserving or fixes of spec section 10:
  * selection never touches prompt-residual or decoded positions (10.11), ties are broken by
    position (10.14), entropy_bounded finishes every block (10.12): see `strategies`;
  * stop tokens in the prompt residual are ignored (10.15), and a stop token beyond the
    `max_new_tokens` cap is not appended (`commit_block`);
  * a block whose outcome is already fixed (an unmasked stop token, or the cap, before any
    remaining mask) is committed at once instead of denoising masks that would be dropped; the
    save pass is fused into the next forward and the last block has none. Tokens and traces are
    unchanged; forwards are saved.

Trace: for every output token, the sequence's global 1-based denoising step at which it was
unmasked (spec 2.4 `step_map`: only denoising steps count, not prefill or saving). The sampler's
log-prob of each token (under the filtered distribution it was drawn from) comes too.

Randomness: row i draws from `fold_in(fold_in(rng, i), global_step)`, so its draws do not depend
on the batch size, `max_active`, sharding, or what other sequences do.

The mask token is never proposed (its logit is set to -inf before filtering): a committed token
equal to `<|MASK|>` would be indistinguishable from a mask for the model and for the trainer.

Compiled pieces (`BlockDiffusionSampler.programs` lists them with abstract arguments for AOT):
`_start` (allocate slots, stage and rollout), `_refill` (prefill staged prompts, start rows in
free slots; state and stage donated), `_decode` (the `lax.while_loop`, state donated; an
iteration limit is a traced argument, so a caller can run it in chunks for a progress bar) and
`_outputs`; one compile each per (rows, prompt bucket, max_new_tokens) and sampling shape. On CPU
the sampler streams the layer weights one array per layer (`per_layer_weights_pay`: XLA:CPU would
copy every weight slice a scan over the stacked layers takes, about the model per forward); the
decode's layer loop is then unrolled, compiling in time linear in depth; the answers are the same
bit for bit (tests/test_decode_paths.py). A small CPU decode (its largest forward at most 32 tokens)
is compiled with XLA:CPU's YNNPACK fusions off (`decode_xla_options`, per program: the rest of the
process keeps XLA's defaults): XLA's own kernels for few-row matmuls are faster there (batch-1
static forwards 71.7 -> 50.7 ms at 125M, `benchmarks/results/rollout.json`); only matmul rounding
changes.

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
from tradojax.models.transformer import DTYPES, Decoder, KVCache, per_layer_view
from tradojax.ops.masks import MaskRule, inference_segments
from tradojax.parallel.axes import BATCH_AXES
from tradojax.parallel.sharding import param_sharding, shard_params, to_host
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
    num_forwards: int  # batched decode forwards (model calls; b tokens per row cached, the canvas uncached)
    prefill_forwards: int  # batched prefill forwards (0 uncached)
    save_forwards: int = 0  # decode forwards that also wrote decided blocks' K/V (2b tokens per row)

    @property
    def forwards(self) -> int:
        """Model calls of the whole generate (decode + prefill)."""
        return self.num_forwards + self.prefill_forwards

    def to_numpy(self) -> Rollout:
        """The same rollout with every array as a numpy array (the whole batch, on every host)."""
        return dataclasses.replace(
            self, **{f.name: to_host(getattr(self, f.name)) for f in dataclasses.fields(self)
                     if f.name not in ("num_forwards", "prefill_forwards", "save_forwards")})

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
    save_forwards: int = 0  # of `forwards`, those that also wrote decided blocks' K/V (2b tokens per row)


# ----------------------------------------------------------------------------------------------
# Compiled state
# ----------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything the decode loop carries. Per-slot fields have the slot axis first (axis 1 for
    k/v): `replicas * max_active` slots, replica d owning slots [d * A, (d + 1) * A). The `rows_*`
    fields are the rollout being written, `replicas * rows_per_replica` rows, split the same way."""

    k: jax.Array | None  # [layers, slots, S, Hkv, D] (cached mode)
    v: jax.Array | None
    canvas: jax.Array | None  # [slots, S] token ids (uncached mode)
    length: jax.Array  # [slots] committed tokens (cache slots / canvas prefix in use)
    block_tokens: jax.Array  # [slots, b]
    masked: jax.Array  # [slots, b] bool: still a mask
    block_trace: jax.Array  # [slots, b] int32
    block_logprob: jax.Array  # [slots, b] float32
    prompt_count: jax.Array  # [slots] leading prompt-residual positions of the current block
    step_in_block: jax.Array  # [slots]
    global_step: jax.Array  # [slots]
    active: jax.Array  # [slots] bool: decoding a row (else free)
    save: jax.Array  # [slots] bool: `saved_tokens` is decided, its K/V not yet in the cache
    saved_tokens: jax.Array  # [slots, b]
    out_len: jax.Array  # [slots] tokens the slot's row has output
    row: jax.Array  # [slots] int32: the slot's row within its replica (rows_per_replica = none)
    row_keys: jax.Array  # [slots] typed PRNG keys
    rows_tokens: jax.Array  # [rows, G + b] (b spare columns so a block write never clips)
    rows_trace: jax.Array
    rows_logprob: jax.Array
    rows_length: jax.Array  # [rows]
    rows_hit_stop: jax.Array  # [rows] bool
    rows_steps: jax.Array  # [rows]
    num_forwards: jax.Array  # [] int32: decode forwards
    save_forwards: jax.Array  # [] int32: decode forwards that also wrote a decided block's K/V


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Stage:
    """Prefilled prompts waiting for slots, `staged` entries per replica: one prefill per prompt,
    copied into a slot for each of its `num_samples` rows as slots free up."""

    k: jax.Array | None  # [layers, entries, bucket, Hkv, D] (cached mode)
    v: jax.Array | None
    tokens: jax.Array  # [entries, bucket]
    prefill_len: jax.Array  # [entries] prompt tokens in the cache (whole blocks)
    first_block: jax.Array  # [entries, b]: the prompt residual, then masks
    residual: jax.Array  # [entries]


_SLOT_AXIS = {"k": 1, "v": 1}
# Tokens per decode forward (resident sequences x b) up to which the fused save is taken whenever
# any sequence has a block to save (weight-bandwidth-bound: 2b tokens cost about what b do).
_FUSE_ALWAYS_TOKENS = 256
_REPLICATED = ("num_forwards", "save_forwards")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The static (shape- and branch-deciding) part of a decode; hashable for jit."""

    block_size: int
    steps: int
    top_k: int
    use_top_p: bool
    strategy: str
    slots: int  # cache slots (canvas width) per sequence
    bucket: int  # prompt width
    max_new_tokens: int
    cached: bool
    mask_id: int
    pad_id: int
    replicas: int  # data-parallel replicas (the slot and row axes split evenly over them)
    max_active: int  # sequence slots per replica
    staged: int  # stage entries (prefilled prompts) per replica
    rows_per_replica: int
    refill_at: int  # the loop leaves for a refill once a replica has this many free slots (or all it needs)
    fuse_always: bool  # take the fused save forward whenever a block waits to be saved (see `_iteration`)
    cache_layout: tuple[int, int, int]  # layers, kv_heads, head_dim
    cache_dtype: str
    batch_axes: tuple[str, ...]
    mesh: Mesh | None

    def layout_only(self) -> _Plan:
        """This plan with the sampling choices blanked: start and refill do not depend on them, so
        their compiled programs serve every strategy and filter."""
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


def _leaf_spec(name: str, ndim: int, plan: _Plan) -> PartitionSpec:
    """A state or stage field's layout: per-slot / per-row / per-entry axes split over the data
    axes, the K/V caches' kv_heads over `tensor` (as the rollout's attention weights are, so no
    chip holds heads it does not compute), counters replicated."""
    spec = [None] * ndim
    if name in _REPLICATED or plan.mesh is None:
        return PartitionSpec(*spec)
    spec[_SLOT_AXIS.get(name, 0)] = plan.batch_axes or None
    tensor = plan.mesh.shape.get("tensor", 1)
    if name in _SLOT_AXIS and tensor > 1 and plan.cache_layout[1] % tensor == 0:
        spec[3] = "tensor"  # [layers, slots, length, kv_heads, head_dim]
    return PartitionSpec(*spec)


def _constrain_tree(tree, plan: _Plan):
    """Every field laid out by `_leaf_spec`."""
    if plan.mesh is None:
        return tree
    fields = {}
    for f in dataclasses.fields(tree):
        value = getattr(tree, f.name)
        fields[f.name] = value if value is None or f.name in _REPLICATED else jax.lax.with_sharding_constraint(
            value, NamedSharding(plan.mesh, _leaf_spec(f.name, value.ndim, plan)))
    return type(tree)(**fields)


def _per_row(fn: Callable, *args):
    """vmap over rows (axis 0 of every argument)."""
    return jax.vmap(fn)(*args)


def _by_replica(x: jax.Array, replicas: int, axis: int = 0) -> jax.Array:
    """[replicas * n, ...] -> [replicas, n, ...] along `axis` (each replica's part is local)."""
    return x.reshape(x.shape[:axis] + (replicas, x.shape[axis] // replicas) + x.shape[axis + 1:])


def _start(plan: _Plan) -> tuple[DecodeState, Stage]:
    """Every slot free, the rollout all padding, the stage empty (keys are drawn per row at admission)."""
    b, dp = plan.block_size, plan.replicas
    slots, entries, rows = dp * plan.max_active, dp * plan.staged, dp * plan.rows_per_replica
    width = plan.max_new_tokens + b
    k = v = canvas = stage_k = stage_v = None
    if plan.cached:
        layers, kv_heads, head_dim = plan.cache_layout
        dtype = DTYPES[plan.cache_dtype]
        k = jnp.zeros((layers, slots, plan.slots, kv_heads, head_dim), dtype)
        v = jnp.zeros_like(k)
        stage_k = jnp.zeros((layers, entries, plan.bucket, kv_heads, head_dim), dtype)
        stage_v = jnp.zeros_like(stage_k)
    else:
        canvas = jnp.full((slots, plan.slots), plan.pad_id, jnp.int32)
    zeros = jnp.zeros((slots,), jnp.int32)
    state = DecodeState(
        k=k, v=v, canvas=canvas, length=zeros,
        block_tokens=jnp.full((slots, b), plan.mask_id, jnp.int32), masked=jnp.zeros((slots, b), bool),
        block_trace=jnp.zeros((slots, b), jnp.int32), block_logprob=jnp.zeros((slots, b), jnp.float32),
        prompt_count=zeros, step_in_block=zeros, global_step=zeros,
        active=jnp.zeros((slots,), bool), save=jnp.zeros((slots,), bool),
        saved_tokens=jnp.full((slots, b), plan.mask_id, jnp.int32), out_len=zeros,
        row=jnp.full((slots,), plan.rows_per_replica, jnp.int32),
        row_keys=jax.random.split(jax.random.key(0), slots),
        rows_tokens=jnp.full((rows, width), plan.pad_id, jnp.int32),
        rows_trace=jnp.zeros((rows, width), jnp.int32), rows_logprob=jnp.zeros((rows, width), jnp.float32),
        rows_length=jnp.zeros((rows,), jnp.int32), rows_hit_stop=jnp.zeros((rows,), bool),
        rows_steps=jnp.zeros((rows,), jnp.int32),
        num_forwards=jnp.zeros((), jnp.int32), save_forwards=jnp.zeros((), jnp.int32))
    stage = Stage(k=stage_k, v=stage_v, tokens=jnp.full((entries, plan.bucket), plan.pad_id, jnp.int32),
                  prefill_len=jnp.zeros((entries,), jnp.int32), first_block=jnp.full((entries, b), plan.mask_id, jnp.int32),
                  residual=jnp.zeros((entries,), jnp.int32))
    return _constrain_tree(state, plan), _constrain_tree(stage, plan)


def _refill(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, stage: Stage, load_tokens: jax.Array,
            load_lengths: jax.Array, load: jax.Array, assign_entry: jax.Array, assign_row: jax.Array,
            rng: jax.Array, plan: _Plan) -> tuple[DecodeState, Stage]:
    """Prefills the prompts `load` marks into their stage entries (one forward for all of them,
    skipped when none loads), then starts a row in every slot with `assign_entry >= 0`: the
    slot takes that entry's (of its own replica) prefilled cache and first block, and row
    `assign_row` (its row within the replica) with its own key."""
    b, dp = plan.block_size, plan.replicas
    prefill_len = (load_lengths // b) * b
    residual = load_lengths - prefill_len
    position = jnp.arange(b, dtype=jnp.int32)
    padded = jnp.pad(load_tokens, ((0, 0), (0, b)), constant_values=plan.pad_id)
    residual_tokens = jnp.take_along_axis(padded, prefill_len[:, None] + position[None, :], axis=1)
    first_block = jnp.where(position[None, :] < residual[:, None], residual_tokens, plan.mask_id).astype(jnp.int32)
    stage_k, stage_v = stage.k, stage.v
    if plan.cached:
        def prefill(_):
            model: Decoder = nnx.merge(graphdef, params)
            cache = KVCache.zeros(model.config, load_tokens.shape[0], plan.bucket, DTYPES[plan.cache_dtype])
            cache = model.prefill(load_tokens, prefill_len, cache, b)
            keep = load[None, :, None, None, None]
            return jnp.where(keep, cache.k, stage.k), jnp.where(keep, cache.v, stage.v)

        stage_k, stage_v = jax.lax.cond(jnp.any(load), prefill, lambda _: (stage.k, stage.v), None)
    stage = _constrain_tree(Stage(
        k=stage_k, v=stage_v, tokens=jnp.where(load[:, None], load_tokens, stage.tokens),
        prefill_len=jnp.where(load, prefill_len, stage.prefill_len),
        first_block=jnp.where(load[:, None], first_block, stage.first_block),
        residual=jnp.where(load, residual, stage.residual)), plan)

    # Admission: slot j of replica d takes entry assign_entry[j] of replica d.
    admit = assign_entry >= 0
    entry = _by_replica(jnp.maximum(assign_entry, 0), dp)  # [dp, A]

    def staged(x, axis=0):  # [dp * staged, ...] -> the entry of every slot, [dp * A, ...]
        grouped = _by_replica(x, dp, axis)
        index = entry.reshape(entry.shape + (1,) * (grouped.ndim - axis - 2))
        if axis:
            index = index[None]
        taken = jnp.take_along_axis(grouped, index, axis=axis + 1)
        return taken.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 1:])

    def take(new, old, axis=0):
        mask = admit.reshape((1,) * axis + admit.shape + (1,) * (new.ndim - axis - 1))
        return jnp.where(mask, new, old)

    k, v, canvas = state.k, state.v, state.canvas
    if plan.cached:
        prompt_part = (slice(None), slice(None), slice(0, plan.bucket))
        k = k.at[prompt_part].set(take(staged(stage.k, 1), k[prompt_part], 1))
        v = v.at[prompt_part].set(take(staged(stage.v, 1), v[prompt_part], 1))
    else:
        prompts = jnp.pad(staged(stage.tokens), ((0, 0), (0, plan.slots - plan.bucket)), constant_values=plan.pad_id)
        canvas = take(prompts, canvas)
    first = staged(stage.first_block)
    residual = staged(stage.residual)
    replica = jnp.repeat(jnp.arange(dp, dtype=jnp.int32), plan.max_active)
    global_row = replica * plan.rows_per_replica + assign_row
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(global_row)
    zeros = jnp.zeros_like(state.length)
    new_state = dataclasses.replace(
        state, k=k, v=v, canvas=canvas,
        length=take(staged(stage.prefill_len), state.length),
        block_tokens=take(first, state.block_tokens),
        masked=take(position[None, :] >= residual[:, None], state.masked),
        block_trace=take(jnp.zeros_like(state.block_trace), state.block_trace),
        block_logprob=take(jnp.zeros_like(state.block_logprob), state.block_logprob),
        prompt_count=take(residual, state.prompt_count),
        step_in_block=take(zeros, state.step_in_block), global_step=take(zeros, state.global_step),
        active=state.active | admit, save=state.save & ~admit, out_len=take(zeros, state.out_len),
        row=take(assign_row, state.row), row_keys=jnp.where(admit, keys, state.row_keys))
    return _constrain_tree(new_state, plan), stage


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


def _commit_values(block_tokens, block_trace, block_logprob, prompt_count, complete, out_len, stop_ids,
                   max_new_tokens: int, pad_id: int):
    """What `commit_block` appends: ([N, b] tokens, trace, logprobs to write at out_len, padding
    where nothing is appended), new out_len, hit_stop, finished."""
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
    values = (jnp.where(appended, tokens, pad_id).astype(jnp.int32), jnp.where(appended, trace, 0).astype(jnp.int32),
              jnp.where(appended, logprob, 0.0).astype(jnp.float32))
    return values, new_len, hit_stop, finished


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
    values, new_len, hit_stop, finished = _commit_values(
        block_tokens, block_trace, block_logprob, prompt_count, complete, out_len, stop_ids, max_new_tokens, pad_id)

    def write(buffer, vals):
        return _per_row(lambda row, v, start: jax.lax.dynamic_update_slice_in_dim(row, v, start, 0),
                        buffer, vals.astype(buffer.dtype), out_len)

    # Slots [out_len, out_len + b) hold padding before the write, so padding keeps them unchanged.
    tokens, trace, logprob = values
    return (write(out_tokens, tokens), write(out_trace, trace), write(out_logprob, logprob),
            new_len, hit_stop, finished)


def _write_rows(state: DecodeState, complete: jax.Array, values, new_len, hit_stop, plan: _Plan) -> dict:
    """Scatters every complete block's committed tokens into its row of the rollout (within the
    slot's own replica: rows are split over replicas like slots)."""
    dp, b = plan.replicas, plan.block_size
    target = _by_replica(jnp.where(complete, state.row, plan.rows_per_replica), dp)  # out of range: dropped
    columns = _by_replica(state.out_len[:, None] + jnp.arange(b, dtype=jnp.int32)[None, :], dp)

    def blocks(buffer, vals):
        def one(buf, rows, cols, v):
            return buf.at[rows[:, None], cols].set(v, mode="drop")

        out = jax.vmap(one)(_by_replica(buffer, dp), target, columns, _by_replica(vals, dp))
        return out.reshape(buffer.shape)

    def scalars(buffer, vals):
        out = jax.vmap(lambda buf, rows, v: buf.at[rows].set(v, mode="drop"))(
            _by_replica(buffer, dp), target, _by_replica(vals, dp))
        return out.reshape(buffer.shape)

    tokens, trace, logprob = values
    return dict(rows_tokens=blocks(state.rows_tokens, tokens), rows_trace=blocks(state.rows_trace, trace),
                rows_logprob=blocks(state.rows_logprob, logprob), rows_length=scalars(state.rows_length, new_len),
                rows_hit_stop=scalars(state.rows_hit_stop, hit_stop))


def _write_blocks(cache: jax.Array, blocks: jax.Array, start: jax.Array, write: jax.Array) -> jax.Array:
    """cache [layers, N, S, ...] with rows `write` [N] taking `blocks` [layers, N, b, ...] at slots
    [start, start + b); the other rows' updates are dropped (aimed past the cache). One scatter in
    the cache's own layout: a vmapped dynamic_update_slice over axis 1 transposes the whole cache."""
    rows = jnp.arange(cache.shape[1], dtype=jnp.int32)[:, None]
    slots = jnp.where(write[:, None], start[:, None] + jnp.arange(blocks.shape[2], dtype=jnp.int32)[None, :],
                      cache.shape[2])
    return cache.at[:, rows, slots].set(blocks.astype(cache.dtype), mode="drop")


def _iteration(model: Decoder, state: DecodeState, knobs: _Knobs, plan: _Plan) -> DecodeState:
    """One batched forward: every active slot takes a denoising step of its current block; slots
    whose previous block was just decided write its K/V in the same forward (the fused save)."""
    b = plan.block_size
    active = state.active
    k, v, canvas, length = state.k, state.v, state.canvas, state.length
    save_forwards = state.save_forwards

    waiting = jnp.zeros_like(active)
    if plan.cached:
        # Free slots attend to an empty cache; their (ignored) writes land beyond their length.
        cache = KVCache(k, v, jnp.where(active, length, 0))
        saving = state.save & active
        num_saving = jnp.sum(saving, dtype=jnp.int32)
        # The fused forward costs 2b tokens for every resident sequence: taken whenever a block is
        # to be saved while decode is bandwidth-bound (few tokens per forward), else once at least
        # half the resident sequences have one (the others' saves wait an iteration: compute-bound
        # forwards then cost at most what separate save passes would).
        if plan.fuse_always:
            fuse = num_saving > 0
        else:
            fuse = (num_saving > 0) & (2 * num_saving >= jnp.sum(active, dtype=jnp.int32))

        # The branches return only the decided blocks' K/V, written below: a cache returned by a
        # `lax.cond` is copied whole every iteration (XLA:CPU), hundreds of MB at batch.
        block_kv_shape = (plan.cache_layout[0], active.shape[0], b, *plan.cache_layout[1:])

        def fused(_):
            logits, k_first, v_first = model.fused_save_forward(state.saved_tokens, saving, state.block_tokens, cache)
            return logits, k_first.astype(k.dtype), v_first.astype(v.dtype)

        def plain(_):
            logits, _ = model.decode_block(state.block_tokens, cache, commit=False)
            return logits, jnp.zeros(block_kv_shape, k.dtype), jnp.zeros(block_kv_shape, v.dtype)

        logits, k_first, v_first = jax.lax.cond(fuse, fused, plain, None)
        k = _write_blocks(k, k_first, cache.length, saving & fuse)
        v = _write_blocks(v, v_first, cache.length, saving & fuse)
        length = length + jnp.where(saving & fuse, b, 0)
        save_forwards = save_forwards + fuse.astype(jnp.int32)
        waiting = saving & ~fuse  # no step this iteration: their block is not saved yet
        active = active & ~waiting
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
        plan.strategy, state.masked & active[:, None], proposal, quota,
        dynamic_threshold=knobs.dynamic_threshold, eb_threshold=knobs.eb_threshold)

    block_tokens = jnp.where(transfer, proposal.tokens, state.block_tokens)
    block_logprob = jnp.where(transfer, proposal.logprob, state.block_logprob)
    block_trace = jnp.where(transfer, state.global_step[:, None] + 1, state.block_trace)
    masked = state.masked & ~transfer
    step_in_block = state.step_in_block + active
    global_step = state.global_step + active
    decided = block_decided(block_tokens, masked, state.prompt_count, state.out_len, knobs.stop_ids,
                            plan.max_new_tokens)
    complete = active & (~jnp.any(masked, axis=1) | (step_in_block >= plan.steps) | decided)

    values, out_len, hit_now, finished = _commit_values(
        block_tokens, block_trace, block_logprob, state.prompt_count, complete, state.out_len,
        knobs.stop_ids, plan.max_new_tokens, plan.pad_id)
    rows = _write_rows(state, complete, values, out_len, hit_now, plan)
    rows["rows_steps"] = jax.vmap(lambda buf, r, s: buf.at[r].set(s, mode="drop"))(
        _by_replica(state.rows_steps, plan.replicas),
        _by_replica(jnp.where(complete, state.row, plan.rows_per_replica), plan.replicas),
        _by_replica(global_step, plan.replicas)).reshape(state.rows_steps.shape)
    continues = complete & ~finished

    if plan.cached:  # the decided block's K/V go in with the next forward (fused)
        save = continues | waiting
        saved_tokens = jnp.where(continues[:, None], block_tokens, state.saved_tokens)
    else:  # the canvas takes the block at once
        save, saved_tokens = state.save, state.saved_tokens
        canvas = jnp.where(
            continues[:, None],
            _per_row(lambda row, block, start: jax.lax.dynamic_update_slice_in_dim(row, block, start, 0),
                     canvas, block_tokens, length),
            canvas)
        length = jnp.where(continues, length + b, length)

    fresh = continues[:, None]
    new_state = dataclasses.replace(
        state, k=k, v=v, canvas=canvas, length=length,
        block_tokens=jnp.where(fresh, plan.mask_id, block_tokens),
        masked=jnp.where(fresh, True, masked),
        block_trace=jnp.where(fresh, 0, block_trace),
        block_logprob=jnp.where(fresh, 0.0, block_logprob),
        prompt_count=jnp.where(continues, 0, state.prompt_count),
        step_in_block=jnp.where(continues, 0, step_in_block),
        global_step=global_step, active=(active | waiting) & ~finished, save=save, saved_tokens=saved_tokens,
        out_len=out_len, **rows,
        num_forwards=state.num_forwards + 1, save_forwards=save_forwards,
    )
    return _constrain_tree(new_state, plan)


def _decode(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, knobs: _Knobs,
            limit: jax.Array, pending: jax.Array, plan: _Plan) -> tuple[DecodeState, jax.Array, jax.Array]:
    """Runs iterations until no slot is active, `limit` iterations have run, or a replica with
    `pending` [replicas] rows still to start has free slots for `refill_at` of them (or all).

    Also returns, replicated (every host reads them without gathering the sharded state), an int32
    summary [tokens generated, forwards, save forwards] and the free slots [replicas * A] bool."""
    model: Decoder = nnx.merge(graphdef, params)

    def refill_due(s):
        free = jnp.sum(_by_replica(~s.active, plan.replicas), axis=1)
        return jnp.any((pending > 0) & (free >= jnp.minimum(pending, plan.refill_at)))

    def cond(carry):
        iteration, s = carry
        return (iteration < limit) & jnp.any(s.active) & ~refill_due(s)

    def body(carry):
        iteration, s = carry
        return iteration + 1, _iteration(model, s, knobs, plan)

    _, state = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))
    summary = jnp.stack([jnp.sum(state.rows_length, dtype=jnp.int32), state.num_forwards, state.save_forwards])
    return state, _replicated(summary, plan), _replicated(~state.active, plan)


def _replicated(x: jax.Array, plan: _Plan) -> jax.Array:
    if plan.mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(plan.mesh, PartitionSpec()))


def _outputs(state: DecodeState, plan: _Plan, rows: int) -> dict[str, jax.Array]:
    """The rollout arrays of the first `rows` rows (the real ones), replicated (readable on every host)."""
    g = plan.max_new_tokens
    arrays = {"tokens": state.rows_tokens[:rows, :g], "lengths": state.rows_length[:rows],
              "trace": state.rows_trace[:rows, :g], "logprobs": state.rows_logprob[:rows, :g],
              "hit_stop": state.rows_hit_stop[:rows], "num_steps": state.rows_steps[:rows]}
    return {name: _replicated(value, plan) for name, value in arrays.items()}


_start_jit = jax.jit(_start, static_argnames=("plan",))
_refill_jit = jax.jit(_refill, static_argnames=("graphdef", "plan"), donate_argnames=("state", "stage"))
_outputs_jit = jax.jit(_outputs, static_argnames=("plan", "rows"))


@functools.lru_cache(maxsize=None)
def _decode_program(xla_options: tuple[tuple[str, str], ...]) -> Callable:
    """`_decode` jitted with these XLA compiler options (per program: the rest of the process keeps
    XLA's defaults); one jitted function per option set."""
    return jax.jit(_decode, static_argnames=("graphdef", "plan"), donate_argnames=("state",),
                   compiler_options=dict(xla_options) or None)


_decode_jit = _decode_program(())  # XLA's defaults


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
    if sampling.max_active < 1:
        raise ConfigError(f"sampling.max_active: must be >= 1, got {sampling.max_active}")
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


def _global_array(x: Any, sharding: NamedSharding) -> jax.Array:
    """A value every process holds in full, as one array laid out by `sharding`: `device_put` on one
    process; across processes each fills only its own devices' shards (a mesh spanning hosts has
    devices `device_put` cannot address)."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _global_array(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def per_layer_weights_pay(mesh: Mesh | None) -> bool:
    """Whether the decode reads the layer weights as one array per layer (`per_layer_view`)
    instead of the stacked layout's `lax.scan`: on CPU, where XLA copies every weight slice the
    scan takes (about the model's bytes per forward; the per-layer loop reads each weight in place,
    same values). TPU and GPU keep the scan (their compilers feed sliced weights to the matmuls
    without a copy, and compile time stays independent of depth). The platform is the mesh's
    (an AOT compile for TPU on a CPU host decides for TPU), else the default backend's."""
    return _platform(mesh) == "cpu"


# XLA:CPU's YNNPACK fusions off (dots fall back to XLA's own kernels): its kernels for the few-row
# matmuls of a small decode forward are slow (benchmarks/small_matmul.py, benchmarks/rollout.py).
CPU_SMALL_DECODE_OPTIONS = (("xla_cpu_experimental_ynn_fusion_type", ""),)
# Tokens of a decode's largest forward (the fused save's: 2b per resident sequence) up to which the
# CPU decode compiles with them (XLA's default kernels win from about 64 rows per matmul).
_CPU_SMALL_DECODE_TOKENS = 32


def decode_xla_options(mesh: Mesh | None, largest_forward_tokens: int) -> tuple[tuple[str, str], ...]:
    """The XLA compiler options the decode program is compiled with, by platform and size (measured
    by `benchmarks/rollout.py`): on CPU, `CPU_SMALL_DECODE_OPTIONS` where the largest forward has at
    most `_CPU_SMALL_DECODE_TOKENS` tokens; none elsewhere."""
    if _platform(mesh) == "cpu" and largest_forward_tokens <= _CPU_SMALL_DECODE_TOKENS:
        return CPU_SMALL_DECODE_OPTIONS
    return ()


def _platform(mesh: Mesh | None) -> str:
    """The platform the sampler's programs run on: the mesh's devices', else the default backend's."""
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def _rollout_weight_sharding(path, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """The rollout sharding of a weight leaf at a tree `path`, stacked or one layer's (`per_layer_view`
    leaves: the stacked rule without its `layers` axis, which is never split)."""
    names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    if not any(isinstance(k, jax.tree_util.SequenceKey) for k in path):
        return param_sharding(".".join(names), shape, mesh, role="rollout")
    stacked = param_sharding(".".join(names), (1, *shape), mesh, role="rollout")
    return NamedSharding(mesh, PartitionSpec(*tuple(stacked.spec)[1:]))


@functools.partial(jax.jit, static_argnames=("mesh",))
def _split_layers(params: nnx.State, mesh: Mesh | None) -> nnx.State:
    """`per_layer_view` as one compiled copy of the layer weights, each layer laid out as the stacked
    array was (no host round trip; works on a mesh spanning processes)."""
    split = per_layer_view(params)
    if mesh is None:
        return split
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.lax.with_sharding_constraint(x, _rollout_weight_sharding(path, x.shape, mesh)), split)


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


class _Schedule:
    """Host bookkeeping of one `generate`: which prompts are staged and which slots hold rows.

    Per replica d: its prompts (local index p, global d * prompts_per_replica + p) wait unloaded;
    the stage is reloaded with the next `staged` of them once every staged row has started; free
    slots take the staged rows in order (row p * num_samples + sample within the replica)."""

    def __init__(self, plan: _Plan, tokens: np.ndarray, lengths: np.ndarray, num_real: int, num_samples: int):
        self.plan, self.tokens, self.lengths, self.num_samples = plan, tokens, lengths, num_samples
        per_replica = tokens.shape[0] // plan.replicas
        self.unloaded = [[p for p in range(per_replica) if d * per_replica + p < num_real]
                         for d in range(plan.replicas)]
        self.per_replica = per_replica
        self.stage: list[list[list[int] | None]] = [[None] * plan.staged for _ in range(plan.replicas)]
        self.free = np.ones(plan.replicas * plan.max_active, bool)
        self.started = 0

    def _staged_left(self, d: int) -> int:
        return sum(self.num_samples - e[1] for e in self.stage[d] if e is not None)

    def pending(self) -> np.ndarray:
        """[replicas] rows not started yet."""
        return np.array([self.num_samples * len(self.unloaded[d]) + self._staged_left(d)
                         for d in range(self.plan.replicas)], np.int32)

    def next_refill(self):
        """The inputs of one refill call, or None when no free slot can take a row."""
        p = self.plan
        entries, slots = p.replicas * p.staged, p.replicas * p.max_active
        load = np.zeros(entries, bool)
        load_tokens = np.repeat(self.tokens[:1], entries, axis=0)  # entries not loaded: any valid prompt
        load_lengths = np.full(entries, self.lengths[0], np.int32)
        assign_entry = np.full(slots, -1, np.int32)
        assign_row = np.full(slots, p.rows_per_replica, np.int32)
        for d in range(p.replicas):
            free = np.flatnonzero(self.free[d * p.max_active:(d + 1) * p.max_active])
            if free.size == 0:
                continue
            stage = self.stage[d]
            if self._staged_left(d) == 0 and self.unloaded[d]:
                for e in range(p.staged):
                    if not self.unloaded[d]:
                        stage[e] = None
                        continue
                    prompt = self.unloaded[d].pop(0)
                    stage[e] = [prompt, 0]
                    load[d * p.staged + e] = True
                    load_tokens[d * p.staged + e] = self.tokens[d * self.per_replica + prompt]
                    load_lengths[d * p.staged + e] = self.lengths[d * self.per_replica + prompt]
            for slot in free:
                entry = next((e for e, x in enumerate(stage) if x is not None and x[1] < self.num_samples), None)
                if entry is None:
                    break
                prompt, sample = stage[entry]
                stage[entry][1] += 1
                assign_entry[d * p.max_active + slot] = entry
                assign_row[d * p.max_active + slot] = prompt * self.num_samples + sample
                self.free[d * p.max_active + slot] = False
                self.started += 1
        if (assign_entry < 0).all():
            return None
        return load_tokens, load_lengths, load, assign_entry, assign_row


class BlockDiffusionSampler:
    """Generates responses from an SDAR/TraDo model with the cached (or reference) block sampler.

    Usage: `BlockDiffusionSampler(model, config.sampling).generate(prompt_ids, rng=0)`. For RL,
    pass the current parameters to each `generate(..., params=...)` call; compiled code is reused
    as long as the shapes (rows, prompt bucket, max_new_tokens) and static options do not change.
    At most `sampling.max_active` sequences per data-parallel replica are resident at once.
    """

    def __init__(self, model: Decoder, sampling: SamplingConfig, *, mesh: Mesh | None = None, cached: bool = True,
                 per_layer: bool | None = None, xla_options: tuple[tuple[str, str], ...] | None = None):
        self.model_config: ModelConfig = model.config
        check_sampling(sampling, self.model_config)
        self.sampling = sampling
        self.mesh = mesh
        self.cached = cached
        self.graphdef, self._model_params = nnx.split(model)
        self.batch_axes: tuple[str, ...] = ()
        self.data_parallel = 1
        if mesh is not None:
            self.batch_axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
            self.data_parallel = math.prod(mesh.shape[a] for a in self.batch_axes)
        # the layer weights one array per layer (default: where that pays); either way the same answers
        self.per_layer = per_layer_weights_pay(mesh) if per_layer is None else per_layer
        # the decode program's XLA options (default: `decode_xla_options`, by platform and size)
        self.xla_options = xla_options

    def _decode_fn(self, plan: _Plan) -> Callable:
        """The jitted decode for this plan, compiled with this sampler's XLA options."""
        return _decode_program(self._xla_options(plan))

    def _xla_options(self, plan: _Plan) -> tuple[tuple[str, str], ...]:
        if self.xla_options is not None:
            return tuple(self.xla_options)
        # the largest forward: the fused save's 2b tokens per sequence, or the uncached whole canvas
        per_sequence = 2 * plan.block_size if plan.cached else plan.slots
        return decode_xla_options(self.mesh, plan.max_active * per_sequence)

    @functools.cached_property
    def params(self) -> nnx.State:
        """The model's own weights as the sampler streams them, placed on first use: a caller that
        always passes `generate(params=...)` (the RL loop) never holds this extra copy."""
        return self._place(self._model_params)

    def _place(self, params: nnx.State) -> nnx.State:
        """The weights as the decode streams them: the compute dtype (`rollout_params`), the
        rollout's sharding, one array per layer where that pays (`per_layer_weights_pay`)."""
        params = rollout_params(params, self.model_config)
        if self.mesh is not None:
            params = shard_params(params, self.mesh, role="rollout")
        return _split_layers(params, self.mesh) if self.per_layer else params

    def _plan(self, bucket: int, num_prompts: int) -> _Plan:
        """The plan for `num_prompts` prompts (a multiple of the data-parallel size) in `bucket`."""
        s, c = self.sampling, self.model_config
        per_replica = num_prompts // self.data_parallel
        rows = per_replica * s.num_samples
        active = min(s.max_active, rows)
        return _Plan(
            block_size=s.block_size, steps=s.denoising_steps, top_k=s.top_k, use_top_p=s.top_p < 1.0,
            strategy=s.remasking_strategy,
            slots=cache_slots(bucket, s.block_size, s.max_new_tokens), bucket=bucket, max_new_tokens=s.max_new_tokens,
            cached=self.cached, mask_id=c.mask_token_id, pad_id=c.pad_token_id,
            replicas=self.data_parallel, max_active=active,
            staged=min(-(-active // s.num_samples) + 1, per_replica), rows_per_replica=rows,
            refill_at=max(1, active // 8), fuse_always=active * s.block_size <= _FUSE_ALWAYS_TOKENS,
            cache_layout=(c.num_layers, c.num_kv_heads, c.head_dim),
            cache_dtype=c.compute_dtype, batch_axes=self.batch_axes, mesh=self.mesh)

    def _prompt_layout(self, num_real: int) -> int:
        """Prompts after padding to a multiple of the data-parallel size."""
        return -(-num_real // self.data_parallel) * self.data_parallel

    # ------------------------------------------------------------------ AOT

    def abstract_params(self) -> nnx.State:
        """The placed weights' shapes, dtypes and shardings (no memory): what `generate` streams."""
        abstract = jax.eval_shape(lambda p: rollout_params(p, self.model_config), self._model_params)
        if self.per_layer:
            abstract = jax.eval_shape(per_layer_view, abstract)
        if self.mesh is None:
            return abstract
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                    sharding=_rollout_weight_sharding(path, leaf.shape, self.mesh)),
            abstract)

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

    def _abstract_tree(self, tree, plan: _Plan):
        """An abstract decode state or stage with the shardings `_constrain_tree` gives its leaves."""
        fields = {}
        for f in dataclasses.fields(tree):
            leaf = getattr(tree, f.name)
            if leaf is None:
                fields[f.name] = None
                continue
            sharding = None
            if self.mesh is not None:
                sharding = NamedSharding(self.mesh, _leaf_spec(f.name, leaf.ndim, plan))
            fields[f.name] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
        return type(tree)(**fields)

    def programs(self, rows: int, prompt_len: int) -> dict[str, tuple[Callable, tuple, dict]]:
        """Every jitted function `generate` runs for `rows` sequences with prompts padded to
        `prompt_len`, as {name: (jitted_fn, args, kwargs)} with abstract arguments (shapes, dtypes,
        and this sampler's shardings on its mesh; static arguments concrete), so that
        `fn.lower(*args, **kwargs).compile()` compiles exactly the program `generate` runs (for AOT
        memory and cost reports; works on a sampler built from `abstract_model`).

        start: allocates the slots (KV cache of `max_active` sequences per replica), the stage and
        the rollout; refill: prefills staged prompts and starts rows in free slots; decode: the
        denoising loop (until a refill is due or every row is done); outputs: the rollout arrays."""
        plan = self._plan_for(rows, prompt_len)
        num_real = -(-rows // self.sampling.num_samples)
        params = self.abstract_params()
        rng = self._abstract_replicated(jax.random.key(0))
        state, stage = _start_jit.eval_shape(plan.layout_only())
        state, stage = self._abstract_tree(state, plan), self._abstract_tree(stage, plan)
        entries, slots = plan.replicas * plan.staged, plan.replicas * plan.max_active
        refill_args = (self.graphdef, params, state, stage, self._abstract_rows((entries, plan.bucket), jnp.int32),
                       self._abstract_rows((entries,), jnp.int32), self._abstract_rows((entries,), jnp.bool_),
                       self._abstract_rows((slots,), jnp.int32), self._abstract_rows((slots,), jnp.int32), rng,
                       plan.layout_only())
        decode_args = (self.graphdef, params, state, self._abstract_replicated(self._knobs()),
                       self._abstract_replicated(jnp.int32(0)),
                       self._abstract_replicated(jnp.zeros((plan.replicas,), jnp.int32)), plan)
        return {
            "start": (_start_jit, (plan.layout_only(),), {}),
            "refill": (_refill_jit, refill_args, {}),
            "decode": (self._decode_fn(plan), decode_args, {}),
            "outputs": (_outputs_jit, (state, plan, num_real * self.sampling.num_samples), {}),
        }

    def _plan_for(self, rows: int, prompt_len: int) -> _Plan:
        """The plan `generate` runs for `rows` sequences with prompts padded to `prompt_len`."""
        s = self.sampling
        num_prompts = self._prompt_layout(-(-rows // s.num_samples))
        return self._plan(prompt_bucket(prompt_len, s.prompt_buckets), num_prompts)

    def decode_options(self, rows: int, prompt_len: int) -> dict[str, str]:
        """The XLA compiler options the decode program for `rows` sequences is compiled with."""
        return dict(self._xla_options(self._plan_for(rows, prompt_len)))

    # ------------------------------------------------------------------ generation

    def _knobs(self) -> _Knobs:
        s = self.sampling
        stop_list = (self.model_config.eos_token_id, *s.stop_token_ids)
        stop_ids = np.full((-(-len(stop_list) // 8) * 8,), -1, np.int32)
        stop_ids[: len(stop_list)] = stop_list
        return _Knobs(temperature=jnp.float32(s.temperature), top_p=jnp.float32(s.top_p),
                      dynamic_threshold=jnp.float32(s.dynamic_threshold),
                      eb_threshold=jnp.float32(s.eb_threshold), stop_ids=jnp.asarray(stop_ids))

    def max_iterations(self) -> int:
        """An upper bound on the decode iterations one sequence takes (every row finishes within it)."""
        s = self.sampling
        blocks = -(-(s.max_new_tokens + s.block_size - 1) // s.block_size)
        return blocks * s.denoising_steps

    def place_rows(self, x: np.ndarray) -> jax.Array:
        """A per-row host array on the device(s): axis 0 split over the mesh's data axes."""
        if self.mesh is None:
            return jnp.asarray(x)
        spec = PartitionSpec(self.batch_axes or None, *([None] * (np.ndim(x) - 1)))
        return _global_array(x, NamedSharding(self.mesh, spec))

    def _replicate(self, tree: Any) -> Any:
        """Small inputs (key, knobs, limits) committed replicated over the mesh, as `programs` says."""
        if self.mesh is None:
            return tree
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.tree.map(lambda x: _global_array(x, replicated), tree)

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
          progress: called after every compiled decode chunk with a `Progress`.
          iterations_per_call: decode iterations per compiled call (default: until a refill is due
            or all rows are done); smaller values give a live progress bar at the cost of a host
            round trip per chunk.
        """
        s = self.sampling
        arrays = check_prompts(prompts, s, self.model_config)
        num_real = len(arrays)
        num_prompts = self._prompt_layout(num_real)
        bucket = prompt_bucket(max(a.size for a in arrays), s.prompt_buckets)
        plan = self._plan(bucket, num_prompts)
        tokens = np.full((num_prompts, bucket), self.model_config.pad_token_id, np.int32)
        lengths = np.ones((num_prompts,), np.int32)
        for i, ids in enumerate(arrays):
            tokens[i, : ids.size] = ids
            lengths[i] = ids.size
        tokens[num_real:] = tokens[0]  # padding prompts (for an even split over the mesh) are never started
        lengths[num_real:] = lengths[0]

        if rng is None:
            rng = s.seed
        if isinstance(rng, (int, np.integer)):
            rng = jax.random.key(int(rng))
        rng = self._replicate(rng)
        params = self.params if params is None else self._place(params)
        knobs = self._replicate(self._knobs())
        real_rows = num_real * s.num_samples
        schedule = _Schedule(plan, tokens, lengths, num_real, s.num_samples)
        total_limit = self.max_iterations() * plan.rows_per_replica  # a safety bound, never reached
        chunk = self._replicate(jnp.int32(total_limit if iterations_per_call is None else max(1, int(iterations_per_call))))
        state, stage = _start_jit(plan.layout_only())
        decode = self._decode_fn(plan)
        loads = spent = saves = 0
        while True:
            while (refill := schedule.next_refill()) is not None:
                load_tokens, load_lengths, load, assign_entry, assign_row = refill
                state, stage = _refill_jit(
                    self.graphdef, params, state, stage, self.place_rows(load_tokens), self.place_rows(load_lengths),
                    self.place_rows(load), self.place_rows(assign_entry), self.place_rows(assign_row), rng,
                    plan.layout_only())
                loads += bool(load.any())
            pending = schedule.pending()
            if not pending.any():
                stage = None  # every row has started: free the staged prompts' cache
            if schedule.free.all():
                break
            state, summary, free = decode(self.graphdef, params, state, knobs, chunk,
                                          self._replicate(jnp.asarray(pending)), plan)
            tokens_generated, spent, saves = (int(x) for x in np.asarray(summary))
            schedule.free = np.array(free)
            if progress is not None:
                progress(Progress(rows_done=schedule.started - int((~schedule.free).sum()), rows_total=real_rows,
                                  tokens_generated=tokens_generated, tokens_budget=real_rows * s.max_new_tokens,
                                  forwards=spent, save_forwards=saves))
            if spent >= total_limit:  # cannot happen: every strategy finishes a block in `steps` steps
                raise RuntimeError(f"decoding did not finish within {total_limit} iterations")
        outputs = _outputs_jit(state, plan, real_rows)
        return Rollout(
            **outputs,
            prompt_index=jnp.repeat(jnp.arange(num_real, dtype=jnp.int32), s.num_samples),
            prompt_lengths=jnp.repeat(jnp.asarray(lengths[:num_real]), s.num_samples),
            num_forwards=spent,
            prefill_forwards=loads if self.cached else 0,
            save_forwards=saves,
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


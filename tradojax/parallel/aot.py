"""Ahead-of-time compilation for a TPU topology on any host (`tradojax aot`).

With the `libtpu` package installed, `jax.experimental.topologies` describes the chips of a TPU
slice without the slice being attached; `jax.jit(step).lower(abstract inputs with shardings on a
mesh of those devices).compile()` runs the real TPU compiler (XLA + Mosaic for Pallas kernels),
and the compiled executable reports per-chip memory. This proves that a step lowers and fits
before a TPU is ever booked.

Steps (`--steps`, comma-separated):
  forward   block-causal forward returning every target log-prob ([batch, length]).
  rollout   the sampler's two programs at `--batch` sequences, rollout shardings:
            rollout/prefill  prefill of the prompts (`--batch / samples-per-prompt` of them) at the
                             prompt bucket, then the broadcast to one KV cache row per sequence with
                             `bucket + max_new_tokens` slots (what the sampler's start does);
            rollout/decode   one cached block-decode iteration: `decode_block(commit=True)` of every
                             sequence's block against its cache, proposal sampling and the remasking
                             choice; the KV cache is donated and sharded over batch (data axes) and
                             kv_heads (tensor).
  update    one TraceRL policy update (`training.step.make_train_step` with the RL loop's policy
            loss) on `--rows` rows of [L0 + 2 * L1] tokens, AdamW state (float32 moments),
            params and optimizer state donated, train shardings, remat as configured.

FLOPs are analytic model FLOPs per chip (XLA's cost analysis counts a scanned layer once):
2 per weight per token, plus 4 * head_dim per head per visible (query, key) pair counted exactly
from the mask rule; an update is forward + backward (2x) + the remat recompute of the layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tradojax.config import Config, MeshConfig, load_config, split_config_args
from tradojax.models.transformer import KVCache, abstract_model
from tradojax.ops.masks import MaskRule, Segments, dense_mask, inference_segments, training_segments
from tradojax.parallel.mesh import batch_sharding, data_parallel_size, logical_to_spec, make_mesh
from tradojax.parallel.sharding import param_sharding, state_shardings

# High-bandwidth memory per chip, GiB (public Cloud TPU specs).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# Chips per host of a multi-host slice (v4/v5p: 4; v5e/v6e: up to 8 as 2x4, 4 in larger pods).
_HOST_BOUNDS = {"v4": (2, 2, 1), "v5p": (2, 2, 1), "v5e": (2, 2, 1), "v6e": (2, 2, 1)}

KV_CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


def tpu_devices(topology: str) -> list[jax.Device]:
    """The devices of a TPU topology such as `v5p:2x2x1`, `v5e:2x2`, `v6e:4x4` or `v5e:1x1` (needs libtpu)."""
    from jax.experimental import topologies

    # describing a topology opens no chip: let several compile-only processes load libtpu at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    generation, _, shape = topology.partition(":")
    if generation not in HBM_GIB:
        raise ValueError(f"--topology {topology!r}: unknown TPU generation {generation!r} (known: {sorted(HBM_GIB)})")
    if not re.fullmatch(r"\d+(x\d+){1,2}", shape):
        raise ValueError(f"--topology {topology!r}: expected GENERATION:AxB or GENERATION:AxBxC, e.g. v5p:2x2x1")
    dims = [int(d) for d in shape.split("x")] + [1] * (3 - len(shape.split("x")))
    # a slice smaller than one host's chips is one host holding all of them
    bounds = tuple(min(b, d) for b, d in zip(_HOST_BOUNDS[generation], dims))
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topology, chip_config_name="default",
            chips_per_host_bounds=bounds, num_slices=1)
    except Exception as err:  # libtpu missing or a malformed name: say which
        raise ValueError(f"--topology {topology!r}: cannot describe it ({type(err).__name__}: {err}); "
                         "is the `libtpu` package installed (pip install 'tradojax[tpu-compile]')?") from err
    return list(desc.devices)


# ----------------------------------------------------------------------------------------------
# Analytic FLOPs
# ----------------------------------------------------------------------------------------------


def layer_matmul_params(model) -> int:
    """Weights every token multiplies through the decoder layers (projections and MLP)."""
    d, hd = model.hidden_size, model.head_dim
    attention = d * (model.num_heads + 2 * model.num_kv_heads) * hd + model.num_heads * hd * d
    return model.num_layers * (attention + 3 * d * model.intermediate_size)


def visible_pairs(segments: Segments, rule: MaskRule = MaskRule.BLOCK_DIFFUSION) -> int:
    """(query, key) pairs the mask rule lets attend, summed over the batch of `segments`."""
    return int(jnp.sum(dense_mask(rule, segments, segments, self_attention=True)))


def model_flops(model, *, layer_tokens: int, head_tokens: int, attention_pairs: int) -> float:
    """One forward: 2 FLOPs per weight per token through the layers and the LM head (the embedding
    lookup is free), plus scores and values (2 * head_dim each) per head per visible pair."""
    head = model.hidden_size * model.vocab_size
    attention = 4 * model.num_layers * model.num_heads * model.head_dim * attention_pairs
    return 2.0 * layer_matmul_params(model) * layer_tokens + 2.0 * head * head_tokens + attention


def forward_flops(model, batch: int, length: int) -> float:
    """A block-causal forward of [batch, length] with logits at every position."""
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    pairs = visible_pairs(inference_segments(positions, jnp.ones((1, length), bool), model.block_size))
    tokens = batch * length
    return model_flops(model, layer_tokens=tokens, head_tokens=tokens, attention_pairs=batch * pairs)


def update_flops(model, rows: int, prompt_length: int, response_length: int, block_size: int) -> float:
    """A policy update on [rows, L0 + 2 L1]: the dual-stream forward (logits on the noisy copy
    only), the backward (twice the forward) and, with remat="full", the layers' forward again."""
    block, kind, valid, _ = training_segments(np.ones((1, prompt_length), bool), response_length, block_size)
    pairs = visible_pairs(Segments(jnp.asarray(block), jnp.asarray(kind), jnp.asarray(valid)))
    length = prompt_length + 2 * response_length
    layers_only = model_flops(model, layer_tokens=rows * length, head_tokens=0, attention_pairs=rows * pairs)
    forward = layers_only + 2.0 * model.hidden_size * model.vocab_size * rows * response_length
    recompute = layers_only if model.remat == "full" else 0.0
    return 3.0 * forward + recompute


def prefill_flops(model, prompts: int, bucket: int) -> float:
    """Prefill of full-length prompts (no logits)."""
    positions = jnp.arange(bucket, dtype=jnp.int32)[None]
    pairs = visible_pairs(inference_segments(positions, jnp.ones((1, bucket), bool), model.block_size))
    return model_flops(model, layer_tokens=prompts * bucket, head_tokens=0, attention_pairs=prompts * pairs)


def decode_flops(model, sequences: int, block_size: int, bucket: int, response_length: int) -> float:
    """One decode iteration: every sequence's block against a cache filled, on average over a
    rollout, with the prompt and half the response."""
    keys_per_query = bucket + response_length / 2 + block_size
    tokens = sequences * block_size
    return model_flops(model, layer_tokens=tokens, head_tokens=tokens, attention_pairs=int(tokens * keys_per_query))


# ----------------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CompiledStep:
    name: str
    flops: float  # per chip, analytic model FLOPs
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written into donated arguments (counted once in peak_bytes)
    temp_bytes: int
    code_bytes: int
    compile_s: float
    lowered_text: str  # StableHLO before compilation (the compiled HLO text is not readable
    # across the jaxlib/libtpu proto boundary)
    error: str = ""  # the compiler's refusal (e.g. out of HBM); the byte counts are then 0
    required_bytes: int = 0  # with an out-of-HBM error: what the compiler said the program needs

    @property
    def peak_bytes(self) -> int:
        """Per-chip bytes live at once: arguments, outputs not aliased to them, temporaries, code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def compile_step(name: str, fn: Callable, args: tuple, in_shardings, out_shardings=None,
                 donate_argnums=(), flops: float = 0.0) -> CompiledStep:
    """Lowers and compiles `fn` for the devices of the shardings; a compiler refusal (out of
    memory) is returned as a CompiledStep with `error` set, anything else raises."""
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums)
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    try:
        compiled = lowered.compile()
    except Exception as err:  # XLA reports HBM exhaustion as an error of the compile
        message = str(err)
        if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
            raise
        first_line = message.strip().splitlines()[0][:400]
        return CompiledStep(name=name, flops=flops, argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=0,
                            code_bytes=0, compile_s=time.perf_counter() - start, lowered_text="",
                            error=first_line, required_bytes=oom_required_bytes(first_line))
    elapsed = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return CompiledStep(
        name=name,
        flops=flops,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(getattr(memory, "alias_size_in_bytes", 0)),
        temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        compile_s=elapsed,
        lowered_text=lowered.as_text(),
    )


def oom_required_bytes(message: str) -> int:
    """The bytes an out-of-HBM compile error says the program needs (0 if it does not say), from
    XLA:TPU's "... memory required for HLO temporaries (40.54G) exceeds available HBM (31.24G)"."""
    found = re.search(r"required for [^(]*\(([\d.]+)([KMGT])\)", message)
    if not found:
        return 0
    return int(float(found.group(1)) * 2 ** (10 * "KMGT".index(found.group(2)) + 10))


def abstract_params(config: Config, mesh: Mesh, role: str):
    """(graphdef, params as ShapeDtypeStructs carrying their shardings, the shardings)."""
    graphdef, params = nnx.split(abstract_model(config.model))
    shardings = state_shardings(params, mesh, role)
    abstract = nnx.map_state(
        lambda path, leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=param_sharding(
            ".".join(str(p) for p in path), leaf.shape, mesh, role)), params)
    return graphdef, abstract, shardings


def _abstract(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


@dataclasses.dataclass(frozen=True)
class StepShapes:
    """Global shapes of the compiled steps."""

    batch: int  # forward rows
    length: int  # forward sequence length
    sequences: int  # rollout sequences decoding at once
    rows: int  # update rows per optimizer step
    micro_batch: int  # update rows per micro-step (rows are split into rows // micro_batch)
    prompt_length: int  # L0: the prompt bucket
    response_length: int  # L1: max_new_tokens
    samples_per_prompt: int  # rollout sequences per prefilled prompt (the RL group size)


def forward_step(config: Config, mesh: Mesh, shapes: StepShapes) -> list[CompiledStep]:
    """Block-causal forward returning the log-prob of every target token (what training needs)."""
    graphdef, params, param_shardings = abstract_params(config, mesh, "train")
    block_size = config.model.block_size

    def step(params, tokens, targets):
        model = nnx.merge(graphdef, params)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        segments = inference_segments(positions, jnp.ones(tokens.shape, bool), block_size)
        logits = model(tokens, positions, segments, MaskRule.BLOCK_DIFFUSION)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]

    _check_divides("--batch", shapes.batch, data_parallel_size(mesh), "the train data-parallel size")
    token_sharding = batch_sharding(mesh, 2)
    tokens = _abstract((shapes.batch, shapes.length), jnp.int32, token_sharding)
    return [compile_step("forward", step, (params, tokens, tokens),
                         in_shardings=(param_shardings, token_sharding, token_sharding),
                         out_shardings=token_sharding,
                         flops=forward_flops(config.model, shapes.batch, shapes.length) / mesh.size)]


def _check_divides(flag: str, value: int, divisor: int, what: str) -> None:
    if value < 1 or value % divisor:
        raise ValueError(f"{flag}={value}: must be a positive multiple of {what} ({divisor})")


def rollout_steps(config: Config, mesh: Mesh, shapes: StepShapes) -> list[CompiledStep]:
    """The sampler's prefill (+ broadcast to per-sequence caches) and one cached decode iteration."""
    from tradojax.sampling import strategies
    from tradojax.sampling.block_diffusion import cache_slots

    model_config, sampling = config.model, config.sampling
    graphdef, params, param_shardings = abstract_params(config, mesh, "rollout")
    dp = data_parallel_size(mesh, "rollout")
    b, bucket, n = sampling.block_size, shapes.prompt_length, shapes.samples_per_prompt
    sequences = shapes.sequences
    _check_divides("--batch", sequences, dp, "the rollout data-parallel size")
    prompts = -(-max(sequences // n, 1) // dp) * dp  # the sampler pads prompts to the data-parallel size
    if prompts * n != sequences:
        raise ValueError(f"--batch={sequences}: must be prompts x samples per prompt ({n}) with prompts a "
                         f"multiple of the rollout data-parallel size ({dp}), e.g. {prompts * n}")
    slots = cache_slots(bucket, b, shapes.response_length)
    if model_config.attention_impl == "pallas":  # the TPU decode kernel tiles the cache by 16..512 slots
        slots = -(-slots // 128) * 128
    kv_dtype = jnp.dtype(model_config.compute_dtype)
    kv_shape = (model_config.num_layers, sequences, slots, model_config.num_kv_heads, model_config.head_dim)
    kv_sharding = NamedSharding(mesh, logical_to_spec(KV_CACHE_AXES, kv_shape, mesh, "rollout"))
    prompt_kv_shape = (model_config.num_layers, prompts, bucket, model_config.num_kv_heads, model_config.head_dim)
    prompt_kv_sharding = NamedSharding(mesh, logical_to_spec(KV_CACHE_AXES, prompt_kv_shape, mesh, "rollout"))

    def rows(ndim):
        return batch_sharding(mesh, ndim, "rollout")

    def prefill(params, prompt_tokens, prompt_lengths):
        model = nnx.merge(graphdef, params)
        cache = KVCache.zeros(model_config, prompts, bucket)
        cache = KVCache(jax.lax.with_sharding_constraint(cache.k, prompt_kv_sharding),
                        jax.lax.with_sharding_constraint(cache.v, prompt_kv_sharding), cache.length)
        prefill_lengths = (prompt_lengths // b) * b
        cache = model.prefill(prompt_tokens, prefill_lengths, cache, b)
        widen = ((0, 0), (0, 0), (0, slots - bucket), (0, 0), (0, 0))

        def per_sequence(x):
            return jnp.pad(jnp.repeat(x, n, axis=1, total_repeat_length=sequences), widen)

        return per_sequence(cache.k), per_sequence(cache.v)

    tokens = _abstract((prompts, bucket), jnp.int32, rows(2))
    lengths = _abstract((prompts,), jnp.int32, rows(1))
    prefill_step = compile_step(
        "rollout/prefill", prefill, (params, tokens, lengths), in_shardings=(param_shardings, rows(2), rows(1)),
        out_shardings=(kv_sharding, kv_sharding),
        flops=prefill_flops(model_config, prompts, bucket) / mesh.size)

    schedule = np.asarray(strategies.transfer_schedule(b, sampling.denoising_steps))
    use_top_p = sampling.top_p < 1.0

    def decode(params, k, v, length, block_tokens, masked, key_data, step_in_block):
        model = nnx.merge(graphdef, params)
        logits, cache = model.decode_block(block_tokens, KVCache(k, v, length), commit=True)
        logits = logits.at[..., model_config.mask_token_id].set(-jnp.inf)
        propose = lambda row_logits, key: strategies.sample_tokens(  # noqa: E731
            row_logits, key, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
            use_top_p=use_top_p, with_entropy=sampling.remasking_strategy == "entropy_bounded")
        proposal = jax.vmap(propose)(logits, jax.random.wrap_key_data(key_data))
        quota = jnp.asarray(schedule)[jnp.minimum(step_in_block, sampling.denoising_steps - 1)]
        transfer = strategies.select_transfer(sampling.remasking_strategy, masked, proposal, quota,
                                              dynamic_threshold=sampling.dynamic_threshold,
                                              eb_threshold=sampling.eb_threshold)
        new_tokens = jnp.where(transfer, proposal.tokens, block_tokens)
        logprob = jnp.where(transfer, proposal.logprob, 0.0)
        return cache.k, cache.v, new_tokens, masked & ~transfer, logprob

    key_data_shape = jax.random.key_data(jax.random.key(0)).shape
    args = (params, _abstract(kv_shape, kv_dtype, kv_sharding), _abstract(kv_shape, kv_dtype, kv_sharding),
            _abstract((sequences,), jnp.int32, rows(1)), _abstract((sequences, b), jnp.int32, rows(2)),
            _abstract((sequences, b), jnp.bool_, rows(2)),
            _abstract((sequences, *key_data_shape), jnp.uint32, rows(1 + len(key_data_shape))),
            _abstract((sequences,), jnp.int32, rows(1)))
    decode_step = compile_step(
        "rollout/decode", decode, args,
        in_shardings=(param_shardings, kv_sharding, kv_sharding, rows(1), rows(2), rows(2),
                      rows(1 + len(key_data_shape)), rows(1)),
        out_shardings=(kv_sharding, kv_sharding, rows(2), rows(2), rows(2)),
        donate_argnums=(1, 2),
        flops=decode_flops(model_config, sequences, b, bucket, shapes.response_length) / mesh.size)
    return [prefill_step, decode_step]


def update_step(config: Config, mesh: Mesh, shapes: StepShapes) -> list[CompiledStep]:
    """One TraceRL policy update with AdamW, exactly as the RL loop builds it."""
    from tradojax.rl.loop import policy_loss_fn
    from tradojax.training.rows import Rows
    from tradojax.training.step import make_optimizer, make_train_step

    graphdef, params, param_shardings = abstract_params(config, mesh, "train")
    dp = data_parallel_size(mesh, "train")
    _check_divides("--rows", shapes.rows, shapes.micro_batch, "the micro-batch")
    _check_divides("micro-batch (train.micro_batch_size)", shapes.micro_batch, dp, "the train data-parallel size")
    num_micro = shapes.rows // shapes.micro_batch
    tx = make_optimizer(config.train)
    opt_state = jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shardings = optax.tree_map_params(tx, lambda _, sharding: sharding, opt_state, param_shardings,
                                          transform_non_params=lambda _: replicated)
    opt_state = jax.tree.map(lambda leaf, sharding: _abstract(leaf.shape, leaf.dtype, sharding),
                             opt_state, opt_shardings)
    train_step = make_train_step(graphdef, tx, policy_loss_fn(config), num_micro)

    r, l0, l1 = shapes.rows, shapes.prompt_length, shapes.response_length
    length = l0 + 2 * l1

    def rows_of(shape, dtype):
        return _abstract(shape, dtype, batch_sharding(mesh, len(shape)))

    rows = Rows(tokens=rows_of((r, length), jnp.int32), positions=rows_of((r, length), jnp.int32),
                segments=Segments(rows_of((r, length), jnp.int32), rows_of((r, length), jnp.int32),
                                  rows_of((r, length), jnp.bool_)),
                targets=rows_of((r, l1), jnp.int32), loss_mask=rows_of((r, l1), jnp.bool_),
                weights=rows_of((r,), jnp.float32))
    extra = {"old_logp": rows_of((r, l1), jnp.float32),
             "advantages": rows_of((r, l1) if config.rl.value_model else (r,), jnp.float32)}
    if config.rl.kl_reference == "initial":
        extra["ref_logp"] = rows_of((r, l1), jnp.float32)
    sharding_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    flops = update_flops(config.model, r, l0, l1, config.train.block_size) / mesh.size
    return [compile_step("update", train_step, (params, opt_state, rows, extra),
                         in_shardings=(param_shardings, opt_shardings, sharding_of(rows), sharding_of(extra)),
                         out_shardings=(param_shardings, opt_shardings, replicated),
                         donate_argnums=(0, 1), flops=flops)]


STEPS: dict[str, Callable[[Config, Mesh, StepShapes], list[CompiledStep]]] = {
    "forward": forward_step,
    "rollout": rollout_steps,
    "update": update_step,
}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def aot_mesh(config: Config, devices) -> Mesh:
    """The config's mesh over `devices`; the single-host default (all data) becomes all fsdp."""
    mesh_config = config.mesh
    if (mesh_config.data, mesh_config.fsdp, mesh_config.tensor) == (-1, 1, 1):
        mesh_config = MeshConfig(data=1, fsdp=-1, tensor=1)  # default for big models: shard parameters
    return make_mesh(mesh_config, devices)


def for_tpu(config: Config, attention: str = "config") -> Config:
    """The config with the attention a TPU run uses: `attention` ("config", "reference" or "pallas");
    the config's "auto" resolves to the Pallas kernels as on a TPU, not to this host's choice."""
    if attention not in ("config", "reference", "pallas"):
        raise ValueError(f"--attention: must be 'config', 'reference' or 'pallas', got {attention!r}")
    impl = config.model.attention_impl if attention == "config" else attention
    if impl == "auto":
        impl = "pallas"
    return dataclasses.replace(config, model=dataclasses.replace(config.model, attention_impl=impl))


def default_shapes(config: Config, mesh: Mesh, *, batch: int = 0, length: int = 2048, rows: int = 0,
                   prompt_length: int = 0, response_length: int = 0, samples_per_prompt: int = 0) -> StepShapes:
    """Fills unset (0) shapes: the forward takes one row per train data-parallel shard, the
    rollout one group (`rl.num_responses_per_task` sequences) per rollout data-parallel shard, the
    update one micro-batch of `train.micro_batch_size`; the prompt bucket of `train.max_prompt_len`
    and `sampling.max_new_tokens` new tokens. `batch` sets both the forward and rollout batch."""
    from tradojax.sampling.block_diffusion import prompt_bucket

    dp_train = data_parallel_size(mesh, "train")
    micro = config.train.micro_batch_size or dp_train
    n = samples_per_prompt or config.rl.num_responses_per_task
    dp_rollout = data_parallel_size(mesh, "rollout")
    return StepShapes(
        batch=batch or dp_train,
        length=length,
        sequences=batch or n * dp_rollout,
        rows=rows or micro,
        micro_batch=min(micro, rows) if rows else micro,
        prompt_length=prompt_bucket(prompt_length or config.train.max_prompt_len, config.sampling.prompt_buckets),
        response_length=response_length or config.sampling.max_new_tokens,
        samples_per_prompt=n,
    )


def run_steps(config: Config, topology: str, steps: list[str], *, attention: str = "config",
              **shape_args) -> tuple[Mesh, StepShapes, list[CompiledStep]]:
    """Compiles `steps` for `topology` (shapes as in `default_shapes`); returns the mesh, the
    shapes used and one CompiledStep per program."""
    for name in steps:
        if name not in STEPS:
            raise ValueError(f"--steps: unknown step {name!r} (known: {sorted(STEPS)})")
    config = for_tpu(config, attention)
    mesh = aot_mesh(config, tpu_devices(topology))
    shapes = default_shapes(config, mesh, **shape_args)
    results: list[CompiledStep] = []
    for name in steps:
        results.extend(STEPS[name](config, mesh, shapes))
    return mesh, shapes, results


def report_rows(topology: str, mesh: Mesh, shapes: StepShapes, results: list[CompiledStep]) -> list[dict[str, Any]]:
    hbm = HBM_GIB[topology.split(":")[0]] * 2**30
    report = []
    for r in results:
        fits = not r.error and r.peak_bytes <= hbm
        report.append({"step": r.name, "topology": topology, "devices": mesh.size, "mesh": dict(mesh.shape),
                       "batch": shapes.batch, "length": shapes.length, "sequences": shapes.sequences,
                       "rows": shapes.rows,
                       "micro_batch": shapes.micro_batch, "prompt_length": shapes.prompt_length,
                       "response_length": shapes.response_length, "samples_per_prompt": shapes.samples_per_prompt,
                       "argument_bytes": r.argument_bytes, "temp_bytes": r.temp_bytes, "output_bytes": r.output_bytes,
                       "alias_bytes": r.alias_bytes, "code_bytes": r.code_bytes, "peak_bytes": r.peak_bytes,
                       "hbm_bytes": hbm, "fits": fits, "flops_per_chip": r.flops, "compile_s": round(r.compile_s, 2),
                       "error": r.error, "required_bytes": r.required_bytes})
    return report


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def print_table(report: list[dict[str, Any]]) -> None:
    header = (f"{'step':<16} {'args GiB':>9} {'temp GiB':>9} {'out GiB':>8} {'peak GiB':>9} {'HBM %':>6} "
              f"{'TFLOPs/chip':>12} {'compile s':>9}  fits")
    print(header)
    print("-" * len(header))
    for r in report:
        if r["error"]:
            needs = f"needs {_gib(r['required_bytes'])} GiB: " if r["required_bytes"] else ""
            print(f"{r['step']:<16} {needs}{r['error'][:100]}  NO")
            continue
        print(f"{r['step']:<16} {_gib(r['argument_bytes']):>9} {_gib(r['temp_bytes']):>9} {_gib(r['output_bytes']):>8} "
              f"{_gib(r['peak_bytes']):>9} {100 * r['peak_bytes'] / r['hbm_bytes']:>6.1f} "
              f"{r['flops_per_chip'] / 1e12:>12.3f} {r['compile_s']:>9.1f}  {'yes' if r['fits'] else 'NO'}")


def main(argv: list[str]) -> int:
    config_path, overrides, rest = split_config_args(argv)
    parser = argparse.ArgumentParser(prog="tradojax aot", description=__doc__.splitlines()[0])
    parser.add_argument("--topology", required=True, help="e.g. v5p:2x2x1, v5e:2x2, v6e:2x4")
    parser.add_argument("--steps", default="forward", help=f"comma-separated, of {sorted(STEPS)}")
    parser.add_argument("--batch", type=int, default=0,
                        help="forward rows / rollout sequences, global (default: forward and rollout "
                             "fill the data-parallel size, rollout with rl.num_responses_per_task per prompt)")
    parser.add_argument("--length", type=int, default=2048, help="forward sequence length")
    parser.add_argument("--rows", type=int, default=0,
                        help="update rows per optimizer step, global (default: one train.micro_batch_size)")
    parser.add_argument("--prompt-length", type=int, default=0,
                        help="prompt tokens, padded to a sampling.prompt_buckets bucket "
                             "(default: train.max_prompt_len)")
    parser.add_argument("--response-length", type=int, default=0, help="L1 (default: sampling.max_new_tokens)")
    parser.add_argument("--samples-per-prompt", type=int, default=0,
                        help="rollout sequences per prefilled prompt (default: rl.num_responses_per_task)")
    parser.add_argument("--attention", choices=("config", "reference", "pallas"), default="config",
                        help="attention of the TPU program (default: the config's; its 'auto' means the Pallas "
                             "kernels, as on a TPU)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(rest)
    if config_path is None:
        parser.error("--config=FILE is required")
    config = load_config(config_path, overrides)
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f"--steps: unknown step {unknown[0]!r} (known: {sorted(STEPS)})")
    devices = tpu_devices(args.topology)
    generation = args.topology.split(":")[0]
    tpu_config = for_tpu(config, args.attention)
    mesh = aot_mesh(tpu_config, devices)
    shapes = default_shapes(tpu_config, mesh, batch=args.batch, length=args.length, rows=args.rows,
                            prompt_length=args.prompt_length, response_length=args.response_length,
                            samples_per_prompt=args.samples_per_prompt)
    print(f"{config_path}: {config.model.num_params() / 1e9:.2f}B parameters, {config.model.param_dtype} params, "
          f"{config.model.compute_dtype} compute, remat={config.model.remat}, "
          f"attention={tpu_config.model.attention_impl}")
    print(f"topology {args.topology}: {len(devices)} devices ({devices[0].device_kind}), mesh {dict(mesh.shape)}, "
          f"HBM {HBM_GIB[generation]} GiB per chip")
    print(f"shapes: forward {shapes.batch} x {shapes.length}; rollout {shapes.sequences} sequences "
          f"({shapes.samples_per_prompt} per prompt), prompt bucket {shapes.prompt_length}, "
          f"{shapes.response_length} new tokens; update {shapes.rows} rows (micro-batch {shapes.micro_batch}) "
          f"of {shapes.prompt_length} + 2 x {shapes.response_length}")
    results: list[CompiledStep] = []
    for name in steps:
        results.extend(STEPS[name](tpu_config, mesh, shapes))
    report = report_rows(args.topology, mesh, shapes, results)
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

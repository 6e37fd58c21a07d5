"""The block-diffusion rollout engine: cached == uncached == a plain-Python reference decoder,
batching, groups, stopping, traces, sharding and bad input (spec 2.1-2.4)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from helpers import TINY_MODEL
from tradojax.config import ConfigError, MeshConfig, SamplingConfig
from tradojax.models.transformer import apply, init_model
from tradojax.ops.masks import MaskRule, inference_segments
from tradojax.parallel.mesh import make_mesh
from tradojax.sampling import block_diffusion as bd
from tradojax.sampling import strategies
from tradojax.sampling.block_diffusion import (
    BlockDiffusionSampler,
    block_decided,
    cache_slots,
    commit_block,
    generate,
    prompt_bucket,
)

MODEL_CONFIG = TINY_MODEL  # vocab 512, mask 3, eos 0, pad 0
MODEL = init_model(MODEL_CONFIG, seed=0)
RNG = np.random.RandomState(0)
# lengths 3, 9, 14, 8: with b=8 the prompt residuals are 3, 1, 6, 0; with b=4 they are 3, 1, 2, 0
PROMPTS = [RNG.randint(4, MODEL_CONFIG.vocab_size, size=n).tolist() for n in (3, 9, 14, 8)]
GREEDY = SamplingConfig(block_size=4, denoising_steps=4, top_k=1, remasking_strategy="low_confidence_static",
                        max_new_tokens=16, prompt_buckets=(16,))
# Sharp sampling (the random model's logits are nearly flat at temperature 1), b/steps = 2 so the
# quota exceeds the masks left in residual blocks, max_new_tokens not a multiple of b, a stop token
# the model often emits.
STOP_TOKEN = 336
SAMPLED = SamplingConfig(block_size=8, denoising_steps=4, temperature=0.05, top_k=0, top_p=0.9,
                         dynamic_threshold=0.3, eb_threshold=0.35, max_new_tokens=19,
                         stop_token_ids=(STOP_TOKEN,), prompt_buckets=(16,))


@pytest.fixture(scope="module")
def greedy_runs():
    """Greedy static decoding of PROMPTS, cached and uncached (shared by several tests)."""
    cached = BlockDiffusionSampler(MODEL, GREEDY).generate(PROMPTS, rng=0).to_numpy()
    uncached = BlockDiffusionSampler(MODEL, GREEDY, cached=False).generate(PROMPTS, rng=0).to_numpy()
    return cached, uncached


# ----------------------------------------------------------------------------------------------
# A plain-Python reference decoder: one sequence, the model's full forward at every step
# ----------------------------------------------------------------------------------------------


_propose = jax.jit(strategies.sample_tokens, static_argnames=("top_k", "use_top_p", "with_entropy"))


def reference_decode(model, prompt, sampling, rng, row):
    """Decodes one prompt following spec 2.1-2.4 with the engine's documented choices (only masked
    positions are selected, ties by position, entropy_bounded takes at least the quota, a block
    whose outcome is fixed is committed at once, stop tokens in the prompt residual are ignored).
    Returns (tokens, trace, logprobs, hit_stop)."""
    config = model.config
    graphdef, params = nnx.split(model)
    b, steps, limit = sampling.block_size, sampling.denoising_steps, sampling.max_new_tokens
    stop = {config.eos_token_id, *sampling.stop_token_ids}
    schedule = [b // steps + (1 if s < b % steps else 0) for s in range(steps)]
    width = cache_slots(prompt_bucket(len(prompt), sampling.prompt_buckets), b, limit)
    row_key = jax.random.fold_in(rng, row)

    context = list(prompt[: len(prompt) // b * b])
    residual = list(prompt[len(context):])
    block = residual + [config.mask_token_id] * (b - len(residual))
    masked = [False] * len(residual) + [True] * (b - len(residual))
    first = len(residual)  # first completion position of the block
    out, trace, logprobs = [], [], []
    global_step = 0

    def outcome_fixed():
        for j in range(first, b):
            if len(out) + j - first >= limit:
                return True
            if masked[j]:
                return False
            if block[j] in stop:
                return True
        return False

    while True:
        block_trace, block_logprob = [0] * b, [0.0] * b
        for step in range(steps):
            if not any(masked) or outcome_fixed():
                break
            canvas = np.full((1, width), config.pad_token_id, np.int32)
            canvas[0, : len(context) + b] = context + block
            positions = jnp.arange(width)[None]
            segments = inference_segments(positions, positions < len(context) + b, b)
            logits = apply(graphdef, params, jnp.asarray(canvas), positions, segments, MaskRule.BLOCK_DIFFUSION)
            logits = logits[0, len(context): len(context) + b].at[:, config.mask_token_id].set(-jnp.inf)
            proposal = _propose(
                logits, jax.random.fold_in(row_key, global_step), temperature=sampling.temperature,
                top_k=sampling.top_k, top_p=sampling.top_p, use_top_p=sampling.top_p < 1,
                with_entropy=sampling.remasking_strategy == "entropy_bounded")
            tokens, conf, logp, ent = (np.asarray(x) for x in (
                proposal.tokens, proposal.confidence, proposal.logprob, proposal.entropy))
            candidates = [j for j in range(b) if masked[j]]
            quota = schedule[step]
            strategy = sampling.remasking_strategy
            by_confidence = sorted(candidates, key=lambda j: (-conf[j], j))
            if strategy == "sequential":
                chosen = candidates[:quota]
            elif strategy == "low_confidence_static":
                chosen = by_confidence[:quota]
            elif strategy == "low_confidence_dynamic":
                confident = [j for j in candidates if conf[j] > np.float32(sampling.dynamic_threshold)]
                chosen = confident if len(confident) >= quota else by_confidence[:quota]
            else:
                chosen, total = [], np.float32(0)
                for j in sorted(candidates, key=lambda j: (ent[j], j)):
                    total += ent[j]
                    if total < np.float32(sampling.eb_threshold) or len(chosen) < max(quota, 1):
                        chosen.append(j)
                    else:
                        break
            global_step += 1
            for j in chosen:
                assert masked[j]
                block[j], masked[j] = int(tokens[j]), False
                block_trace[j], block_logprob[j] = global_step, float(logp[j])
        finished = hit_stop = False
        for j in range(first, b):
            if len(out) >= limit:
                finished = True
                break
            out.append(block[j])
            trace.append(block_trace[j])
            logprobs.append(block_logprob[j])
            if block[j] in stop:
                finished = hit_stop = True
                break
        if finished or len(out) >= limit:
            return out, trace, logprobs, hit_stop
        context += block
        block, masked, first = [config.mask_token_id] * b, [True] * b, 0


def assert_matches_reference(rollout, sampling, rng):
    stats = {"stops_inside_block": 0, "capped": 0}
    for row, prompt in enumerate(PROMPTS):
        tokens, trace, logprobs, hit_stop = reference_decode(MODEL, prompt, sampling, rng, row)
        n = rollout.lengths[row]
        assert rollout.tokens[row, :n].tolist() == tokens, row
        assert rollout.trace[row, :n].tolist() == trace, row
        np.testing.assert_allclose(rollout.logprobs[row, :n], logprobs, atol=2e-3, rtol=0)
        assert bool(rollout.hit_stop[row]) == hit_stop
        assert (rollout.tokens[row, n:] == MODEL_CONFIG.pad_token_id).all() and (rollout.trace[row, n:] == 0).all()
        end = len(prompt) + n  # canvas position after the last token
        stats["stops_inside_block"] += hit_stop and end % sampling.block_size != 0
        stats["capped"] += not hit_stop
    return stats


# ----------------------------------------------------------------------------------------------
# Equivalences
# ----------------------------------------------------------------------------------------------


def test_cached_equals_uncached_greedy(greedy_runs):
    cached, uncached = greedy_runs
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    np.testing.assert_array_equal(cached.trace, uncached.trace)
    np.testing.assert_array_equal(cached.lengths, uncached.lengths)
    np.testing.assert_array_equal(cached.logprobs, 0.0)  # greedy: every confidence is 1
    # greedy static is left to right (ties broken by position): trace = 1..G
    np.testing.assert_array_equal(cached.trace, np.broadcast_to(np.arange(1, 17), (4, 16)))
    # the save pass rides on the next block's first denoising forward: no forward of its own
    assert cached.num_forwards == uncached.num_forwards == cached.num_steps.max()
    assert 0 < cached.save_forwards < cached.num_forwards and uncached.save_forwards == 0
    assert cached.prefill_forwards == 1 and cached.forwards == cached.num_forwards + 1


def test_greedy_matches_reference_decoder(greedy_runs):
    cached, _ = greedy_runs
    assert_matches_reference(cached, GREEDY, jax.random.key(0))


@pytest.mark.parametrize("strategy", ["low_confidence_static", "low_confidence_dynamic", "sequential", "entropy_bounded"])
def test_sampled_decoding_matches_reference(strategy):
    sampling = dataclasses.replace(SAMPLED, remasking_strategy=strategy)
    sampler = BlockDiffusionSampler(MODEL, sampling)
    # seeds until both endings (a stop token inside a block, the cap) occur; every seed tried must match
    for seed in range(7, 31):
        rng = jax.random.key(seed)
        rollout = sampler.generate(PROMPTS, rng=rng).to_numpy()
        stats = assert_matches_reference(rollout, sampling, rng)
        if stats["stops_inside_block"] >= 1 and stats["capped"] >= 1:
            break
    assert stats["stops_inside_block"] >= 1 and stats["capped"] >= 1, stats  # both endings exercised
    check_trace_structure(rollout, sampling)
    if strategy == "sequential":  # left to right: the trace never decreases along the response
        for row in range(len(PROMPTS)):
            n = rollout.lengths[row]
            assert (np.diff(rollout.trace[row, :n]) >= 0).all()
    if strategy == "low_confidence_dynamic":
        static = BlockDiffusionSampler(MODEL, dataclasses.replace(sampling, remasking_strategy="low_confidence_static"))
        at_one = BlockDiffusionSampler(MODEL, dataclasses.replace(sampling, dynamic_threshold=1.0))
        a = static.generate(PROMPTS, rng=rng).to_numpy()
        c = at_one.generate(PROMPTS, rng=rng).to_numpy()
        np.testing.assert_array_equal(a.tokens, c.tokens)
        np.testing.assert_array_equal(a.trace, c.trace)
        # threshold 0.3 committed more than the quota in some step (fewer steps than static)
        assert (rollout.num_steps < a.num_steps).any()


def check_trace_structure(rollout, sampling):
    """Each token has one step; steps are grouped by inference block and increase across blocks;
    no step commits more than its quota unless the strategy allows it."""
    b = sampling.block_size
    schedule = strategies.transfer_schedule(b, sampling.denoising_steps)
    for row, prompt in enumerate(PROMPTS):
        n = rollout.lengths[row]
        trace = rollout.trace[row, :n]
        assert (trace >= 1).all() and trace.max() <= rollout.num_steps[row]
        blocks = (len(prompt) + np.arange(n)) // b
        for earlier, later in zip(np.unique(blocks)[:-1], np.unique(blocks)[1:]):
            assert trace[blocks == earlier].max() < trace[blocks == later].min()
        if sampling.remasking_strategy in ("low_confidence_static", "sequential"):
            counts = np.bincount(trace)
            assert counts.max() <= schedule.max()


def test_dynamic_greedy_decodes_a_block_per_step(greedy_runs):
    """Spec 10.14: with top_k=1 every confidence is 1.0 > threshold, so a block takes one step."""
    sampling = dataclasses.replace(GREEDY, remasking_strategy="low_confidence_dynamic")
    rollout = BlockDiffusionSampler(MODEL, sampling).generate(PROMPTS, rng=0).to_numpy()
    for row, prompt in enumerate(PROMPTS):
        block = (len(prompt) + np.arange(16)) // 4
        np.testing.assert_array_equal(rollout.trace[row], block - block[0] + 1)
    # one forward per denoising step and none for saving (issue 13): every row's blocks take a
    # step each and the rows run side by side, so the forwards are the longest row's steps
    assert rollout.num_forwards == rollout.num_steps.max() == 5
    assert rollout.save_forwards == rollout.num_forwards - 1  # every forward after the first saves a block


def test_batch_decodes_as_each_prompt_alone(greedy_runs):
    cached, _ = greedy_runs
    sampler = BlockDiffusionSampler(MODEL, GREEDY)
    for row, prompt in enumerate(PROMPTS):
        alone = sampler.generate([prompt], rng=0).to_numpy()
        np.testing.assert_array_equal(alone.tokens[0], cached.tokens[row])
        np.testing.assert_array_equal(alone.trace[0], cached.trace[row])


def test_chunked_decoding_with_progress_equals_one_call(greedy_runs):
    cached, _ = greedy_runs
    seen = []
    rollout = BlockDiffusionSampler(MODEL, GREEDY).generate(
        PROMPTS, rng=0, progress=seen.append, iterations_per_call=3).to_numpy()
    np.testing.assert_array_equal(rollout.tokens, cached.tokens)
    np.testing.assert_array_equal(rollout.trace, cached.trace)
    assert len(seen) >= cached.num_forwards // 3
    assert [p.forwards for p in seen] == sorted(p.forwards for p in seen)
    assert seen[-1].rows_done == seen[-1].rows_total == 4
    assert seen[-1].tokens_generated == int(cached.lengths.sum()) and seen[-1].tokens_budget == 64


# ----------------------------------------------------------------------------------------------
# Stopping and commit semantics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["stop_token_ids", "model.eos_token_id"])
def test_stop_token_truncates_inside_a_block(greedy_runs, route):
    cached, _ = greedy_runs
    # a token first emitted mid-block (not at a block end) in row 1 (prompt length 9)
    row, position = 1, None
    for j in range(16):
        token = cached.tokens[row, j]
        if (9 + j) % 4 not in (3,) and token not in cached.tokens[row, :j] and j > 2:
            position = j
            break
    assert position is not None
    stop = int(cached.tokens[row, position])
    if route == "stop_token_ids":
        sampler = BlockDiffusionSampler(MODEL, dataclasses.replace(GREEDY, stop_token_ids=(stop,)))
    else:  # the same weights under a config whose EOS is that token
        model = init_model(dataclasses.replace(MODEL_CONFIG, eos_token_id=stop), seed=0)
        sampler = BlockDiffusionSampler(model, GREEDY)
    rollout = sampler.generate(PROMPTS, rng=0).to_numpy()
    for r in range(len(PROMPTS)):
        hits = np.flatnonzero(cached.tokens[r] == stop)
        n = hits[0] + 1 if hits.size else 16
        assert rollout.lengths[r] == n and bool(rollout.hit_stop[r]) == bool(hits.size)
        np.testing.assert_array_equal(rollout.tokens[r, :n], cached.tokens[r, :n])
        np.testing.assert_array_equal(rollout.trace[r, :n], cached.trace[r, :n])
        assert (rollout.tokens[r, n:] == 0).all() and (rollout.trace[r, n:] == 0).all()
    assert rollout.lengths[row] == position + 1
    # the block with the stop token was committed as soon as the stop token was unmasked
    assert rollout.num_steps[row] == position + 1


def test_engine_never_rewrites_prompt_or_decoded_tokens():
    """Step by step through the compiled loop (one iteration per call): with b=8 and quota 2, the
    residual blocks (5, 7 and 2 masks) reach steps where the quota exceeds the masks left (spec
    10.11). Prompt-residual and already decoded positions must keep their tokens and steps."""
    sampling = dataclasses.replace(SAMPLED, remasking_strategy="low_confidence_static", stop_token_ids=())
    sampler = BlockDiffusionSampler(MODEL, sampling)
    plan = sampler._plan(16, 4)
    knobs = bd._Knobs(jnp.float32(0.05), jnp.float32(0.9), jnp.float32(0.3), jnp.float32(0.35),
                      jnp.array([0] + [-1] * 7, jnp.int32))
    tokens = np.zeros((4, 16), np.int32)
    for i, p in enumerate(PROMPTS):
        tokens[i, : len(p)] = p
    lengths = np.array([len(p) for p in PROMPTS], np.int32)
    state, stage = bd._start_jit(plan.layout_only())
    schedule = bd._Schedule(plan, tokens, lengths, num_real=4, num_samples=1)
    refill = schedule.next_refill()
    state, stage = bd._refill_jit(sampler.graphdef, sampler.params, state, stage, *map(jnp.asarray, refill),
                                  jax.random.key(2), plan.layout_only())
    assert schedule.next_refill() is None and not schedule.free.any()
    schedule_steps = strategies.transfer_schedule(8, 4)
    overflow_steps = 0
    for _ in range(sampler.max_iterations()):
        before = jax.device_get(state)
        state, summary, free = bd._decode_jit(sampler.graphdef, sampler.params, state, knobs, jnp.int32(1),
                                              jnp.zeros(1, jnp.int32), plan)
        after = jax.device_get(state)
        for r in range(4):
            if not before.active[r]:
                continue
            kept = ~before.masked[r]
            if after.save[r]:  # completed, and the row goes on: the block moved to `saved_tokens`, no mask left
                block, masked = after.saved_tokens[r], np.zeros(8, bool)
            else:
                block, masked = after.block_tokens[r], after.masked[r]
                np.testing.assert_array_equal(after.block_trace[r][kept], before.block_trace[r][kept])
            np.testing.assert_array_equal(block[kept], before.block_tokens[r][kept])
            residual = np.arange(8) < before.prompt_count[r]
            np.testing.assert_array_equal(block[residual], before.block_tokens[r][residual])
            assert not masked[residual].any()
            newly = before.masked[r] & ~masked
            quota = schedule_steps[before.step_in_block[r]]
            assert newly.sum() == min(quota, before.masked[r].sum())  # static: exactly the quota, or all left
            if not after.save[r]:
                assert (after.block_trace[r][newly] == after.global_step[r]).all()
            overflow_steps += quota > before.masked[r].sum()
        if np.asarray(free).all():
            break
    assert np.asarray(free).all() and overflow_steps >= 2


def test_commit_block_by_hand():
    stop_ids = jnp.array([0, 9])
    # rows: (a) prompt residual 2 holding a stop token (ignored: spec 10.15), EOS at block position 3;
    # (b) no stop, cap reached inside the block (out_len 5 of 7); (c) stop id 9 at position 0;
    # (d) not complete: unchanged
    block = jnp.array([[9, 9, 5, 0, 6, 7], [4, 5, 6, 7, 8, 1], [9, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1]])
    trace = jnp.array([[0, 0, 1, 2, 1, 3], [1, 2, 3, 4, 5, 6], [4, 5, 5, 6, 6, 6], [1, 1, 1, 1, 1, 1]])
    logprob = -jnp.arange(24, dtype=jnp.float32).reshape(4, 6) / 10
    prompt_count = jnp.array([2, 0, 0, 0])
    complete = jnp.array([True, True, True, False])
    out_len = jnp.array([0, 5, 1, 2])
    width = 7 + 6
    out_tokens = jnp.full((4, width), -1).at[:, :1].set(33).at[1, :5].set(33).at[3, :2].set(33)
    zeros = jnp.zeros((4, width), jnp.int32)
    tokens, tr, lp, length, hit, finished = commit_block(
        block, trace, logprob, prompt_count, complete, out_tokens, zeros, zeros.astype(jnp.float32), out_len,
        stop_ids, max_new_tokens=7, pad_id=-1)
    assert tokens[0, :3].tolist() == [5, 0, -1] and tr[0, :2].tolist() == [1, 2]
    np.testing.assert_allclose(lp[0, :2], [-0.2, -0.3])
    assert tokens[1, :8].tolist() == [33] * 5 + [4, 5, -1] and tr[1, 5:7].tolist() == [1, 2]
    assert tokens[2, :3].tolist() == [33, 9, -1]
    assert tokens[3, :3].tolist() == [33, 33, -1]
    assert length.tolist() == [2, 7, 2, 2]
    assert hit.tolist() == [True, False, True, False]
    assert finished.tolist() == [True, True, True, False]


def test_block_decided_by_hand():
    stop_ids = jnp.array([0])
    mask = 3
    block = jnp.array([[5, 0, mask, mask], [5, mask, 0, mask], [5, 6, mask, mask], [0, 7, mask, mask],
                       [5, 6, 7, 8]])
    masked = block == mask
    prompt_count = jnp.array([0, 0, 0, 1, 0])
    out_len = jnp.array([0, 0, 8, 0, 0])
    decided = block_decided(block, masked, prompt_count, out_len, stop_ids, max_new_tokens=10)
    # (0) EOS before any mask: decided; (1) a mask before the EOS: not yet; (2) the cap (10) falls
    # after 2 tokens, before the masks: decided; (3) EOS in the prompt residual does not count;
    # (4) a full block without a stop and below the cap: not decided by this rule
    assert decided.tolist() == [True, False, True, False, False]


# ----------------------------------------------------------------------------------------------
# Groups and sharding
# ----------------------------------------------------------------------------------------------


def test_groups_share_prefill_and_equal_repeated_prompts():
    """n samples per prompt == the prompt repeated n times with n = 1 (row keys depend on the row)."""
    sampling = dataclasses.replace(SAMPLED, remasking_strategy="low_confidence_static", num_samples=2)
    grouped = BlockDiffusionSampler(MODEL, sampling).generate(PROMPTS[:3], rng=5).to_numpy()
    repeated_prompts = [p for p in PROMPTS[:3] for _ in range(2)]
    single = BlockDiffusionSampler(MODEL, dataclasses.replace(sampling, num_samples=1)).generate(
        repeated_prompts, rng=5).to_numpy()
    np.testing.assert_array_equal(grouped.tokens, single.tokens)
    np.testing.assert_array_equal(grouped.trace, single.trace)
    np.testing.assert_array_equal(grouped.prompt_index, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(grouped.prompt_lengths, [3, 3, 9, 9, 14, 14])
    assert not np.array_equal(grouped.tokens[0], grouped.tokens[1])  # samples of a group differ



def test_sharded_over_8_devices_equals_unsharded():
    assert len(jax.devices()) == 8
    sampling = dataclasses.replace(SAMPLED, remasking_strategy="low_confidence_static", num_samples=2)
    expected = BlockDiffusionSampler(MODEL, sampling).generate(PROMPTS[:3], rng=5).to_numpy()
    # batch over data x fsdp (4 ways), parameters' heads over tensor (2 ways)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sampler = BlockDiffusionSampler(MODEL, sampling, mesh=mesh)
    assert sampler.data_parallel == 4
    assert sampler.place_rows(np.zeros((8, 2), np.int32)).sharding.spec == PartitionSpec(("data", "fsdp"), None)
    # 3 prompts are padded to 4 (a multiple of the data-parallel size); padding rows are dropped
    rollout = sampler.generate(PROMPTS[:3], rng=5).to_numpy()
    np.testing.assert_array_equal(rollout.tokens, expected.tokens)
    np.testing.assert_array_equal(rollout.trace, expected.trace)
    np.testing.assert_array_equal(rollout.lengths, expected.lengths)
    np.testing.assert_allclose(rollout.logprobs, expected.logprobs, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("block_size", 0, "sampling.block_size"),
    ("denoising_steps", 5, "sampling.denoising_steps"),
    ("dynamic_threshold", 1.5, "sampling.dynamic_threshold"),
    ("dynamic_threshold", -0.1, "sampling.dynamic_threshold"),
    ("top_p", 0.0, "sampling.top_p"),
    ("temperature", 0.0, "sampling.temperature"),
    ("max_active", 0, "sampling.max_active"),
])
def test_bad_sampling_parameters_are_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(GREEDY, **{field: value})
    # an instance that skipped validation is still refused by the engine
    broken = dataclasses.replace(GREEDY)
    object.__setattr__(broken, field, value)
    with pytest.raises(ConfigError, match=message):
        BlockDiffusionSampler(MODEL, broken)


def test_bad_models_and_stop_tokens_are_refused():
    with pytest.raises(ConfigError, match="stop_token_ids\\[1\\]"):
        BlockDiffusionSampler(MODEL, dataclasses.replace(GREEDY, stop_token_ids=(5, 512)))
    llada = init_model(dataclasses.replace(MODEL_CONFIG, family="llada", num_layers=1), seed=0)
    with pytest.raises(ConfigError, match="model.family"):
        BlockDiffusionSampler(llada, GREEDY)


@pytest.mark.parametrize("prompts, error, message", [
    ([], ValueError, "no prompts"),
    ([[5, 6], []], ValueError, r"prompts\[1\] is empty"),
    ([[5, 600]], ValueError, r"prompts\[0\]\[1\] = 600"),
    ([[5, -1]], ValueError, r"prompts\[0\]\[1\] = -1"),
    (["hello"], TypeError, "tokenize"),
    ([[1.5, 2.0]], TypeError, r"prompts\[0\]"),
    ([[5] * 2040], ValueError, r"prompts\[0\] has 2040 tokens.*max_position_embeddings=2048"),
])
def test_bad_prompts_are_refused(prompts, error, message):
    with pytest.raises(error, match=message):
        BlockDiffusionSampler(MODEL, GREEDY).generate(prompts)


def test_buckets_and_slots():
    assert prompt_bucket(5, (16, 32)) == 16 and prompt_bucket(16, (16, 32)) == 16
    assert prompt_bucket(33, (16, 32)) == 64 and prompt_bucket(70, (16, 32)) == 96
    # 15 prompt tokens, b=4: 3 blocks prefilled (12 slots); 16 new tokens + up to 3 residual = 5 blocks
    assert cache_slots(15, 4, 16) == 12 + 20
    assert cache_slots(16, 4, 16) == 16 + 20


def test_generate_function_is_the_sampler(greedy_runs):
    cached, _ = greedy_runs
    rollout = generate(MODEL, PROMPTS, GREEDY, rng=0).to_numpy()
    np.testing.assert_array_equal(rollout.tokens, cached.tokens)
    assert rollout.responses()[0] == cached.tokens[0, : cached.lengths[0]].tolist()
    assert rollout.num_generated == int(cached.lengths.sum())


def test_rollout_params_halve_the_streamed_bytes_and_keep_rollouts_bit_identical():
    """f32 master weights with bf16 compute: the sampler streams bf16 copies of the weights the
    model casts at use (so its rollouts are the ones the f32 weights give) and leaves the rest."""
    config = dataclasses.replace(TINY_MODEL, param_dtype="float32", compute_dtype="bfloat16")
    model = init_model(config, seed=3)
    graphdef, params = nnx.split(model)
    streamed = bd.rollout_params(params, config)
    dtypes = {jax.tree_util.keystr(path): leaf.dtype for path, leaf in jax.tree_util.tree_leaves_with_path(streamed)}
    assert all(dtype == jnp.bfloat16 for path, dtype in dtypes.items() if "norm" not in path or "layers" in path), dtypes
    assert [dtype for path, dtype in dtypes.items() if "layers" not in path and "norm" in path] == [jnp.float32]
    f32_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    assert sum(leaf.nbytes for leaf in jax.tree.leaves(streamed)) < 0.51 * f32_bytes

    sampling = SamplingConfig(max_new_tokens=12, num_samples=2, prompt_buckets=(16,))
    prompts = [[5, 9, 14, 22, 7], [11, 4]]
    from_f32 = bd.BlockDiffusionSampler(model, sampling).generate(prompts, rng=1).to_numpy()
    # the same rollout when the sampler is handed weights that are already bf16
    bf16_model = nnx.merge(graphdef, streamed)
    from_bf16 = bd.BlockDiffusionSampler(bf16_model, sampling).generate(prompts, rng=1).to_numpy()
    np.testing.assert_array_equal(from_f32.tokens, from_bf16.tokens)
    np.testing.assert_array_equal(from_f32.trace, from_bf16.trace)
    np.testing.assert_array_equal(from_f32.logprobs, from_bf16.logprobs)
    # and the model's own forward agrees bit for bit
    tokens = jnp.asarray(np.random.default_rng(0).integers(4, config.vocab_size, (2, 16)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
    segments = inference_segments(positions, positions < 16, 4)
    np.testing.assert_array_equal(np.asarray(model(tokens, positions, segments)),
                                  np.asarray(bf16_model(tokens, positions, segments)))

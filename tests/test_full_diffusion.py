"""The full-attention sampler for LLaDA and Dream (spec 2.6, 2.7): hand-worked proposal and
selection rules, the uncached loop against a float64 plain-Python reference, traces, batching,
the prefix and dual caches, and `tradojax sample` on both families."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tradojax import cli
from tradojax.config import ConfigError, ModelConfig, SamplingConfig
from tradojax.models.transformer import apply, init_model
from tradojax.ops.masks import MaskRule, full_segments
from tradojax.sampling import full_diffusion as fd
from tradojax.sampling.full_diffusion import FullDiffusionConfig, FullDiffusionSampler

MASK, EOS = 3, 0


def tiny_config(family: str) -> ModelConfig:
    return ModelConfig(family=family, vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=False, qkv_bias=family == "dream",
                       initializer_range=0.3, mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS)


MODELS = {family: init_model(tiny_config(family), seed=3) for family in ("llada", "dream")}
RNG = np.random.RandomState(0)
PROMPTS = [RNG.randint(4, 48, size=n).tolist() for n in (3, 5, 4)]
WIDTH = 5  # the longest prompt: the canvas' prompt region


def rows_probs(*rows):
    """Logits [1, b, 4] whose softmax is each given row of probabilities."""
    return jnp.log(jnp.asarray([rows], jnp.float32))


# Three positions built so that each target prefers a different one:
#   A: conf .50, margin .05, entropy .8893   B: conf .40, margin .20, entropy 1.3322
#   C: conf .49, margin 0,   entropy .7912
A = [0.50, 0.45, 0.03, 0.02]
B = [0.40, 0.20, 0.20, 0.20]
C = [0.49, 0.49, 0.01, 0.01]
KEYS = jax.random.split(jax.random.key(0), 1)


# ----------------------------------------------------------------------------------------------
# Proposal and selection rules by hand
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target,expected_score,winner", [
    ("confidence", [0.50, 0.40, 0.49], 0),
    ("margin_confidence", [0.05, 0.20, 0.0], 1),
    # sum p log p: C is the most certain. The original's +entropy would pick B (spec 10.13).
    ("neg_entropy", [-0.8893, -1.3322, -0.7912], 2),
])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_targets_score_and_static_pick_by_hand(family, target, expected_score, winner):
    logits = rows_probs(A, B, C)
    if family == "llada":
        tokens, logprob, score = fd.llada_proposal(logits, KEYS, KEYS, temperature=0.0, target=target)
    else:
        tokens, logprob, score = fd.dream_proposal(logits, KEYS, KEYS, temperature=0.0, top_p=1.0, top_k=0,
                                                   target=target, pad_id=47, pad_target_penalty=1.0)
    np.testing.assert_array_equal(tokens, [[0, 0, 0]])  # greedy; C's tie goes to the lower id
    np.testing.assert_array_equal(logprob, 0.0)  # greedy draws are certain
    np.testing.assert_allclose(score[0], expected_score, atol=2e-4)
    plan = fd._Plan(FullDiffusionConfig(gen_length=3, block_length=3, steps=3, remasking="static"),
                    "llada", 1, MASK, EOS, EOS)
    masked = jnp.ones((1, 3), bool)
    chosen = fd.select_positions(plan, masked, score, jnp.int32(0), jnp.int32(3), jnp.array([1, 1, 1]),
                                 jnp.ones(3), KEYS)
    np.testing.assert_array_equal(chosen[0], np.arange(3) == winner)


def test_dynamic_threshold_is_inclusive_and_falls_back_to_the_best():
    score = jnp.asarray([[0.50, 0.40, 0.49, 0.9]])
    masked = jnp.asarray([[True, True, True, False]])  # an unmasked position never counts
    np.testing.assert_array_equal(fd.dynamic_selection(masked, score, 0.45)[0], [True, False, True, False])
    np.testing.assert_array_equal(fd.dynamic_selection(masked, score, 0.40)[0], [True, True, True, False])
    np.testing.assert_array_equal(fd.dynamic_selection(masked, score, 0.6)[0], [True, False, False, False])


def test_llada_static_quota_follows_the_transfer_schedule():
    # b=5 over 2 steps: 3 then 2; picks by confidence, ties to the lowest position
    settings = FullDiffusionConfig(gen_length=5, block_length=5, steps=2, remasking="static")
    quota, _ = fd.schedule_tables(settings)
    np.testing.assert_array_equal(quota, [[3, 2]])
    plan = fd._Plan(settings, "llada", 1, MASK, EOS, EOS)
    score = jnp.asarray([[0.1, 0.7, 0.7, 0.2, 0.9]])
    first = fd.select_positions(plan, jnp.ones((1, 5), bool), score, jnp.int32(0), jnp.int32(2),
                                jnp.asarray(quota[0]), jnp.ones(2), KEYS)
    np.testing.assert_array_equal(first[0], [False, True, True, False, True])
    second = fd.select_positions(plan, ~first, score, jnp.int32(1), jnp.int32(2), jnp.asarray(quota[0]),
                                 jnp.ones(2), KEYS)
    np.testing.assert_array_equal(second[0], [True, False, False, True, False])


def test_steps_per_block_remainder_goes_to_the_first_blocks():
    assert FullDiffusionConfig(gen_length=12, block_length=4, steps=8).steps_per_block() == (3, 3, 2)
    assert FullDiffusionConfig(gen_length=8, block_length=4, steps=3).steps_per_block() == (2, 1)


def test_dream_static_schedule_by_hand():
    # timesteps = linspace(1, 1e-3, 5) = [1, .75025, .5005, .25075, .001]
    fractions = fd.dream_step_fractions(4, 1e-3)
    np.testing.assert_allclose(fractions, [1.0, 1 - 0.5005 / 0.75025, 1 - 0.25075 / 0.5005, 1.0], rtol=1e-5)
    settings = FullDiffusionConfig(gen_length=4, block_length=4, steps=4, remasking="static")
    plan = fd._Plan(settings, "dream", 1, MASK, EOS, EOS)
    quota, share = fd.schedule_tables(settings)
    score = jnp.asarray([[0.1, 0.3, 0.9, 0.5]])
    masked = jnp.ones((1, 4), bool)
    picks = []
    for step in range(4):  # step 0: the block's first token whatever its score; then 0, 1, then all
        chosen = fd.select_positions(plan, masked, score, jnp.int32(step), jnp.int32(4), jnp.asarray(quota[0]),
                                     jnp.asarray(share[0]), KEYS)
        picks.append(np.flatnonzero(chosen[0]).tolist())
        masked = masked & ~chosen
    assert picks == [[0], [], [2], [1, 3]]


def test_dream_alg_temp_draws_positions_by_softmax_of_scores():
    settings = FullDiffusionConfig(gen_length=4, block_length=4, steps=2, remasking="static", alg_temp=0.5)
    plan = fd._Plan(settings, "dream", 1, MASK, EOS, EOS)
    quota, share = fd.schedule_tables(settings)
    score = jnp.asarray([[0.0, 0.2, 0.9, 0.5]])
    masked = jnp.asarray([[False, True, True, True]])
    keys = jax.random.split(jax.random.key(1), 4000)

    @jax.jit
    def pick(key):  # the last step of the block (all masked positions) is no test: ask for one
        return fd.select_positions(plan, masked, score, jnp.int32(1), jnp.int32(3), jnp.asarray(quota[0]),
                                   jnp.asarray([1.0, 1 / 3, 1.0]), key[None])[0]

    counts = np.asarray(jax.vmap(pick)(keys)).sum(axis=0)
    expected = np.exp(np.array([0.2, 0.9, 0.5]) / 0.5)
    expected = 4000 * expected / expected.sum()
    assert counts[0] == 0
    assert np.all(np.abs(counts[1:] - expected) < 4 * np.sqrt(expected)), (counts, expected)


def test_dream_pad_penalty_and_filter_order():
    logits = rows_probs(A, B)
    _, _, score = fd.dream_proposal(logits, KEYS, KEYS, temperature=0.0, top_p=1.0, top_k=0, target="confidence",
                                    pad_id=0, pad_target_penalty=4.0)
    np.testing.assert_allclose(score[0], [0.50 / 4, 0.40 / 4], rtol=1e-5)  # both propose the pad id 0
    # Dream filters top-p on the whole vocabulary, then top-k: p=.75 keeps 3, k=3 keeps them
    # (top-k first would renormalise to [.44, .33, .22] and top-p would then keep only 2)
    log_probs, ids = fd.dream_filtered(jnp.log(jnp.asarray([0.4, 0.3, 0.2, 0.1])), temperature=0.0, top_p=0.75, top_k=3)
    probs = np.zeros(4)
    probs[np.asarray(ids)] = np.exp(np.asarray(log_probs))
    np.testing.assert_allclose(probs, [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0.0], atol=1e-6)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_sampled_tokens_follow_the_tempered_distribution(family):
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None, None, :]
    keys = jax.random.split(jax.random.key(2), 6000)

    @jax.jit
    def draw(key):
        if family == "llada":
            return fd.llada_proposal(logits, key[None], key[None], temperature=0.5, target="confidence")[:2]
        return fd.dream_proposal(logits, key[None], key[None], temperature=0.5, top_p=1.0, top_k=0,
                                 target="confidence", pad_id=47, pad_target_penalty=1.0)[:2]

    tokens, logprob = (np.asarray(x)[:, 0, 0] for x in jax.vmap(draw)(keys))
    tempered = probs ** 2 / np.sum(probs ** 2)
    counts = np.bincount(tokens, minlength=4)
    assert np.all(np.abs(counts - 6000 * tempered) < 4 * np.sqrt(6000 * tempered) + 1), (counts, tempered)
    np.testing.assert_allclose(logprob, np.log(tempered[tokens]), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The uncached loop against a float64 reference
# ----------------------------------------------------------------------------------------------


def reference_decode(family: str, prompt: list[int], settings: FullDiffusionConfig):
    """One prompt, greedy, a full forward per step, the rules written out in float64 numpy."""
    model = MODELS[family]
    graphdef, params = nnx.split(model)
    b, shift = settings.block_length, 1 if family == "dream" else 0
    pad = WIDTH - len(prompt)
    canvas = np.array([EOS] * pad + prompt + [MASK] * settings.gen_length)
    valid = np.arange(canvas.size) >= pad
    positions = np.maximum(np.arange(canvas.size) - pad, 0)
    trace = np.zeros(settings.gen_length, int)
    step = 0
    for k, budget in enumerate(settings.steps_per_block()):
        start = WIDTH + k * b
        times = np.linspace(1.0, settings.eps, budget + 1).astype(np.float32)
        i = 0
        while (canvas[start:start + b] == MASK).any():
            logits = apply(graphdef, params, jnp.asarray(canvas[None]), jnp.asarray(positions[None]),
                           full_segments(jnp.asarray(valid[None])), MaskRule.FULL)
            rows = np.asarray(logits[0, start - shift:start + b - shift], np.float64)
            rows[:, MASK] = -np.inf
            p = np.exp(rows - rows.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            x0 = p.argmax(-1)
            top2 = np.sort(p, -1)[:, ::-1]
            masked = canvas[start:start + b] == MASK
            with np.errstate(divide="ignore", invalid="ignore"):
                score = {"confidence": top2[:, 0], "margin_confidence": top2[:, 0] - top2[:, 1],
                         "neg_entropy": (np.sum(np.where(p > 0, p * np.log(p), 0), -1) if family == "llada"
                                         else np.sum(p * np.log(p + 1e-10), -1))}[settings.target]
            if family == "dream":
                score = np.where(x0 == EOS, score / settings.pad_target_penalty, score)
            order = sorted(np.flatnonzero(masked), key=lambda j: (-score[j], j))
            if family == "dream" and i == 0:
                picked = [0]
            elif settings.remasking == "dynamic":
                picked = [j for j in order if score[j] >= settings.threshold] or order[:1]
            elif family == "llada":
                base, extra = divmod(b, budget)
                picked = order[:base + (1 if i < extra else 0)]
            else:
                count = masked.sum()
                n = count if i >= budget - 1 else int(np.float32(count) * (np.float32(1) - times[i + 1] / times[i]))
                picked = order[:n]
            step += 1
            for j in picked:
                canvas[start + j] = x0[j]
                trace[start + j - WIDTH] = step
            i += 1
        if np.all(canvas[start:start + b] == EOS):  # eos == pad here
            canvas[start + b:] = EOS
            break
    return canvas[WIDTH:], trace


CASES = {
    "llada_neg_entropy_static": ("llada", dict(target="neg_entropy", remasking="static", steps=4)),
    "llada_margin_dynamic": ("llada", dict(target="margin_confidence", remasking="dynamic", threshold=0.15)),
    "dream_confidence_static": ("dream", dict(target="confidence", remasking="static", steps=8)),
    "dream_neg_entropy_dynamic_pad_penalty": ("dream", dict(target="neg_entropy", remasking="dynamic",
                                                            threshold=-0.5, pad_target_penalty=3.0)),
}


def settings_for(case: str, **overrides) -> FullDiffusionConfig:
    family, fields = CASES[case]
    base = dict(gen_length=8, block_length=4, steps=8, cache="none")
    return FullDiffusionConfig(**{**base, **fields, **overrides})


@pytest.fixture(scope="module")
def uncached_runs():
    return {case: FullDiffusionSampler(MODELS[family], settings_for(case)).generate(PROMPTS, rng=0)
            for case, (family, _) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_uncached_loop_matches_the_reference(case, uncached_runs):
    family, _ = CASES[case]
    rollout = uncached_runs[case]
    for row, prompt in enumerate(PROMPTS):
        tokens, trace = reference_decode(family, prompt, settings_for(case))
        n = rollout.lengths[row]
        np.testing.assert_array_equal(rollout.tokens[row, :n], tokens[:n])
        np.testing.assert_array_equal(rollout.trace[row, :n], trace[:n])
        assert rollout.num_steps[row] == trace.max()


def check_valid_traces(rollout, settings: FullDiffusionConfig, family: str):
    """Every position decoded exactly once, blocks in order, steps within their block's budget."""
    b = settings.block_length
    for row in range(rollout.tokens.shape[0]):
        n = int(rollout.lengths[row])
        trace, tokens = rollout.trace[row, :n], rollout.tokens[row, :n]
        assert (tokens != MASK).all() and (trace >= 1).all() and trace.max() <= rollout.num_steps[row]
        blocks = [trace[k:k + b] for k in range(0, n, b)]
        for earlier, later in zip(blocks, blocks[1:]):
            assert earlier.max() < later.min()
        if settings.remasking == "static" and family == "llada":  # each step commits its quota
            for k, block in enumerate(blocks):
                if len(block) == b:
                    quota, _ = fd.schedule_tables(settings)
                    counts = np.bincount(block - block.min(), minlength=len(quota[k]))
                    np.testing.assert_array_equal(counts[:settings.steps_per_block()[k]],
                                                  quota[k][:settings.steps_per_block()[k]])


@pytest.mark.parametrize("case", list(CASES))
def test_traces_are_a_valid_order(case, uncached_runs):
    family, _ = CASES[case]
    check_valid_traces(uncached_runs[case], settings_for(case), family)


def test_a_block_of_eos_ends_the_row():
    # a zero LM head: every logit ties, so greedy proposes the lowest id, EOS (the mask is never
    # proposed); the first block becomes all EOS, the row ends and the second block is never run
    model = init_model(tiny_config("llada"), seed=3)
    model.lm_head[...] = jnp.zeros_like(model.lm_head[...])
    settings = settings_for("llada_neg_entropy_static")  # 2 steps per block
    rollout = FullDiffusionSampler(model, settings).generate(PROMPTS, rng=0)
    np.testing.assert_array_equal(rollout.lengths, 1)
    assert rollout.hit_stop.all() and (rollout.tokens == EOS).all()
    np.testing.assert_array_equal(rollout.num_steps, 2)
    assert rollout.num_forwards == 2
    np.testing.assert_array_equal(rollout.trace[:, 0], 1)  # ties: the lowest position first


SAMPLED = {
    "llada": FullDiffusionConfig(gen_length=8, block_length=4, steps=6, temperature=0.7, target="random",
                                 remasking="static", cache="none", num_samples=2),
    "dream": FullDiffusionConfig(gen_length=8, block_length=4, steps=8, temperature=0.8, top_p=0.9, top_k=20,
                                 target="confidence", remasking="static", alg_temp=0.3, cache="dual"),
}


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_batch_decodes_as_each_row_alone(family):
    settings = SAMPLED[family]
    sampler = FullDiffusionSampler(MODELS[family], settings)
    batch = sampler.generate(PROMPTS, rng=7)
    check_valid_traces(batch, settings, family)
    rows_per_prompt = settings.num_samples
    assert batch.tokens.shape[0] == len(PROMPTS) * rows_per_prompt
    if rows_per_prompt > 1:  # samples of one prompt differ (their own keys)
        assert not np.array_equal(batch.tokens[0], batch.tokens[1])
    for row in (0, batch.tokens.shape[0] - 1):
        prompt = PROMPTS[batch.prompt_index[row]]
        alone_settings = dataclasses.replace(settings, num_samples=1)
        alone = FullDiffusionSampler(MODELS[family], alone_settings).generate(
            [prompt], rng=7, row_ids=[row], prompt_width=WIDTH)
        np.testing.assert_array_equal(alone.tokens[0], batch.tokens[row])
        np.testing.assert_array_equal(alone.trace[0], batch.trace[row])
        np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[row], atol=1e-6)


def test_waves_on_a_mesh_decode_as_one_batch():
    """max_active=1 on a (data 2, fsdp 2, tensor 2) mesh: waves of 4 rows (one per data replica; the
    6 rows take 2 waves, the second topped up), the rows split over the data axes and the caches'
    kv_heads over tensor; every row decodes as in one unsharded batch."""
    from tradojax.config import MeshConfig
    from tradojax.parallel.mesh import make_mesh

    settings = dataclasses.replace(SAMPLED["dream"], num_samples=2)
    whole = FullDiffusionSampler(MODELS["dream"], settings).generate(PROMPTS, rng=5)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    waves = FullDiffusionSampler(MODELS["dream"], dataclasses.replace(settings, max_active=1), mesh=mesh)
    assert waves.wave_rows(6) == 4
    rollout = waves.generate(PROMPTS, rng=5)
    np.testing.assert_array_equal(rollout.tokens, whole.tokens)
    np.testing.assert_array_equal(rollout.trace, whole.trace)
    np.testing.assert_allclose(rollout.logprobs, whole.logprobs, atol=1e-5)
    assert rollout.num_forwards > whole.num_forwards  # two waves, each its own loop


# ----------------------------------------------------------------------------------------------
# Caches
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,cache", [
    ("llada_neg_entropy_static", "prefix"), ("llada_neg_entropy_static", "dual"),
    ("dream_confidence_static", "prefix"), ("dream_confidence_static", "dual"),
])
def test_caches_refreshed_every_step_reproduce_uncached(case, cache, uncached_runs):
    family, _ = CASES[case]
    exact = FullDiffusionSampler(MODELS[family], settings_for(case, cache=cache, refresh_every=1,
                                                             cached_logits_on_refresh=True))
    rollout = exact.generate(PROMPTS, rng=0)
    reference = uncached_runs[case]
    np.testing.assert_array_equal(rollout.tokens, reference.tokens)
    np.testing.assert_array_equal(rollout.trace, reference.trace)
    # every step went through the cached forward (plus one full refresh per step)
    assert rollout.num_forwards == 2 * reference.num_forwards == 2 * exact.last_full_forwards


@pytest.mark.parametrize("family,cache,horizon", [("dream", "dual", None), ("llada", "prefix", 2)])
def test_cached_forward_on_the_pallas_kernels_gives_the_reference_tokens(family, cache, horizon):
    """attention_impl="pallas" (interpret mode on CPU): the refresh's full forward on the flash
    kernel, the cached span on the decode kernel (`visible_keys_attention`); same tokens and traces
    as the reference attention, log-probs within float32 rounding."""
    settings = FullDiffusionConfig(gen_length=8, block_length=4, steps=8, temperature=0.8, target="confidence",
                                   remasking="static", cache=cache, further_horizon=horizon)
    reference = FullDiffusionSampler(MODELS[family], settings).generate(PROMPTS, rng=1)
    kernel_model = init_model(dataclasses.replace(tiny_config(family), attention_impl="pallas"), seed=3)
    kernels = FullDiffusionSampler(kernel_model, settings).generate(PROMPTS, rng=1)
    np.testing.assert_array_equal(kernels.tokens, reference.tokens)
    np.testing.assert_array_equal(kernels.trace, reference.trace)
    np.testing.assert_allclose(kernels.logprobs, reference.logprobs, atol=1e-4)


def test_stale_caches_refresh_once_per_block():
    settings = settings_for("dream_confidence_static", cache="prefix", further_horizon=1)
    sampler = FullDiffusionSampler(MODELS["dream"], settings)
    rollout = sampler.generate(PROMPTS, rng=0)
    assert sampler.last_full_forwards == 2  # one per block (no row ends after its first block here)
    assert rollout.num_forwards == rollout.num_steps.max() > sampler.last_full_forwards
    check_valid_traces(rollout, settings, "dream")


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="full_diffusion.gen_length"):
        FullDiffusionConfig(gen_length=10, block_length=4)
    with pytest.raises(ConfigError, match="full_diffusion.steps"):
        FullDiffusionConfig(gen_length=8, block_length=4, steps=1)
    with pytest.raises(ConfigError, match="full_diffusion.target"):
        FullDiffusionConfig(target="entropy")
    with pytest.raises(ConfigError, match="sampling.remasking_strategy"):
        FullDiffusionConfig.from_sampling(SamplingConfig(remasking_strategy="sequential"), "llada")
    with pytest.raises(ConfigError, match="model.family"):
        FullDiffusionSampler(init_model(ModelConfig(), seed=0), FullDiffusionConfig())


def test_from_sampling_maps_the_cli_settings():
    sampling = SamplingConfig(block_size=4, denoising_steps=2, top_k=1, max_new_tokens=10,
                              remasking_strategy="low_confidence_dynamic", dynamic_threshold=0.8)
    settings = FullDiffusionConfig.from_sampling(sampling, "llada")
    assert (settings.gen_length, settings.steps, settings.temperature, settings.remasking, settings.threshold,
            settings.max_new_tokens) == (12, 6, 0.0, "dynamic", 0.8, 10)


def test_from_sampling_takes_the_full_attention_fields():
    sampling = SamplingConfig(block_size=4, denoising_steps=2, max_new_tokens=10, gen_length=16, total_steps=6,
                              target="margin_confidence", alg_temp=0.5, pad_target_penalty=2.0, cache_mode="prefix",
                              further_horizon=4, max_active=3, prompt_buckets=(8, 16), seed=9)
    settings = FullDiffusionConfig.from_sampling(sampling, "dream")
    assert (settings.gen_length, settings.steps, settings.steps_per_block(), settings.target, settings.alg_temp,
            settings.pad_target_penalty, settings.cache, settings.further_horizon, settings.max_active) == (
        16, 6, (2, 2, 1, 1), "margin_confidence", 0.5, 2.0, "prefix", 4, 3)
    sampler = FullDiffusionSampler(MODELS["dream"], sampling)
    assert sampler.seed == 9 and sampler.prompt_width(5) == 8 and sampler.prompt_width(9) == 16


@pytest.mark.parametrize("fields,named", [
    (dict(gen_length=10), "sampling.gen_length"),  # not a multiple of block_size 4
    (dict(gen_length=4, max_new_tokens=8), "sampling.gen_length"),  # shorter than the responses
    (dict(total_steps=1, max_new_tokens=8), "sampling.total_steps"),  # fewer than the 2 blocks
    (dict(total_steps=9, max_new_tokens=8), "sampling.total_steps"),  # more than one per token
    (dict(alg_temp=-0.1), "sampling.alg_temp"),
    (dict(pad_target_penalty=0.0), "sampling.pad_target_penalty"),
    (dict(further_horizon=-1), "sampling.further_horizon"),
    (dict(further_horizon=4, cache_mode="dual"), "sampling.further_horizon"),
])
def test_sampling_full_attention_fields_are_checked(fields, named):
    with pytest.raises(ConfigError, match=named):
        SamplingConfig(block_size=4, denoising_steps=4, **fields)


# ----------------------------------------------------------------------------------------------
# tradojax sample
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_sample_command_runs_on_full_attention_models(family, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    code = cli.main(["sample", "--config", "configs/tiny.py", f"--config.model.family={family}",
                     "--config.model.qk_norm=False", f"--config.model.qkv_bias={family == 'dream'}",
                     "--config.sampling.max_new_tokens=6", "--config.sampling.num_samples=2",
                     "--prompt", "What is 2+3?", "--no-progress", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    lines = out.read_text().splitlines()
    assert len(lines) == 2
    record = json.loads(lines[0])
    assert 1 <= len(record["token_ids"]) <= 6 and len(record["step_map"]) == len(record["token_ids"])
    assert min(record["step_map"]) >= 1


# ----------------------------------------------------------------------------------------------
# tradojax eval
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_eval_command_runs_on_full_attention_models(family, tmp_path, capsys):
    """A random tiny LLaDA / Dream model on 3 synthetic math tasks, the default sweep (dynamic
    sampled, static greedy) through the full-attention sampler: results written, accuracy the mean
    correctness of the scored responses."""
    out = tmp_path / "eval.json"
    code = cli.main(["eval", "--config=configs/tiny.py", f"--config.model.family={family}",
                     "--config.model.qk_norm=False", f"--config.model.qkv_bias={family == 'dream'}",
                     "--config.data.synthetic_eval_size=3", "--config.data.synthetic_train_size=10",
                     "--config.eval.num_samples=2", "--config.sampling.max_new_tokens=8",
                     "--config.sampling.max_active=4", "--config.rl.reward_workers=1", "--responses", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    results = json.loads(out.read_text())["results"]
    assert [(r["strategy"], r["top_k"]) for r in results] == [("low_confidence_dynamic", 0), ("low_confidence_static", 1)]
    for r in results:
        assert r["num_tasks"] == 3 and r["num_samples"] == 2 and len(r["responses"]) == 6
        assert r["accuracy"] == pytest.approx(np.mean([x["correct"] for x in r["responses"]]))
        assert 0 < r["mean_length"] <= 8 and r["tokens_per_step"] > 0


# ----------------------------------------------------------------------------------------------
# tradojax aot
# ----------------------------------------------------------------------------------------------


def test_aot_lowers_the_full_attention_sampler_programs_of_rl_dream_7b():
    """configs/rl_dream_7b.py at 2 layers on its slice (v5p:2x2x1, tensor=4): the rollout and eval
    programs are the full-attention sampler's `generate` on one wave (max_active rows, the prompt
    bucket + gen_length canvas), lowered with the Pallas kernels (lowering only: a compile takes
    minutes); the learner's old log-probs lower on single-stream rows ([prompt | noisy])."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from tradojax import aot
    from tradojax.config import load_config
    from tradojax.parallel.mesh import make_mesh

    config = aot.for_tpu(load_config("configs/rl_dream_7b.py", ["model.num_layers=2"]))
    mesh = make_mesh(config.mesh, aot.tpu_devices("v5p:2x2x1"))
    run = aot.run_programs(config, mesh, "rl")
    assert sorted(run.programs) == ["eval/low_confidence_dynamic/top_k=0/generate",
                                    "eval/low_confidence_static/top_k=1/generate", "old_logprobs", "policy_update",
                                    "rollout/generate"]
    assert not run.not_compiled
    old_fn, old_args, old_kwargs = run.programs["old_logprobs"]
    assert old_args[2].tokens.shape[1] == 512 + 1024  # prompt bucket + one response copy
    assert "dot_general" in old_fn.lower(*old_args, **old_kwargs).as_text()
    fn, args, kwargs = run.programs["rollout/generate"]
    assert args[2].shape == (32, 512 + 1024)  # one wave: max_active rows x (prompt bucket + gen_length)
    text = fn.lower(*args, **kwargs).as_text()
    assert "segment_flash_fwd" in text and "block_decode_attention" in text  # refresh and cached span

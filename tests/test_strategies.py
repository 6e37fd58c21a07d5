"""Proposal filtering and remasking strategies against hand-computed numbers (spec 2.1, 2.2)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tradojax.sampling import strategies
from tradojax.sampling.strategies import (
    entropy_bounded,
    filtered_log_probs,
    low_confidence_dynamic,
    low_confidence_static,
    sample_tokens,
    select_transfer,
    sequential,
    transfer_schedule,
)

# probabilities 0.5, 0.3, 0.15, 0.05 at token ids 2, 0, 3, 1 (not sorted, so id mapping is tested)
PROBS = {2: 0.5, 0: 0.3, 3: 0.15, 1: 0.05}
LOGITS = jnp.array([math.log(PROBS[i]) + 1.7 for i in range(4)], jnp.float32)  # +1.7: softmax is shift-free


def filtered(temperature=1.0, top_k=0, top_p=1.0):
    """{token id: probability} of the filtered distribution, zero entries dropped."""
    log_probs, ids = filtered_log_probs(LOGITS, temperature, top_k, top_p, top_p < 1.0)
    probs = np.exp(np.asarray(log_probs, np.float64))
    return {int(i): float(p) for i, p in zip(np.asarray(ids), probs) if p > 0}


def assert_dist(actual, expected, tol=1e-6):
    assert set(actual) == set(expected), (actual, expected)
    for token, p in expected.items():
        assert actual[token] == pytest.approx(p, abs=tol), (token, actual, expected)


@pytest.mark.parametrize("block, steps, expected", [
    (4, 4, [1, 1, 1, 1]), (8, 3, [3, 3, 2]), (7, 2, [4, 3]), (5, 1, [5]), (10, 4, [3, 3, 2, 2]),
])
def test_transfer_schedule(block, steps, expected):
    schedule = transfer_schedule(block, steps)
    assert schedule.tolist() == expected and schedule.sum() == block


@pytest.mark.parametrize("block, steps", [(0, 1), (4, 5), (4, 0)])
def test_transfer_schedule_rejects_bad_sizes(block, steps):
    with pytest.raises(ValueError, match="block_size|steps"):
        transfer_schedule(block, steps)


def test_filters_by_hand():
    assert_dist(filtered(), PROBS)
    # temperature 2: p^(1/2) renormalised; sqrt(.5)+sqrt(.3)+sqrt(.15)+sqrt(.05) = 1.865735
    z = sum(math.sqrt(p) for p in PROBS.values())
    assert z == pytest.approx(1.865735, abs=1e-6)
    assert_dist(filtered(temperature=2.0), {t: math.sqrt(p) / z for t, p in PROBS.items()})
    # top-k 2 keeps ids 2 and 0: 0.5/0.8, 0.3/0.8
    assert_dist(filtered(top_k=2), {2: 0.625, 0: 0.375})
    # top-p: candidate j stays iff the mass before it is <= p (before: 0, .5, .8, .95)
    assert_dist(filtered(top_p=0.6), {2: 0.625, 0: 0.375})
    assert_dist(filtered(top_p=0.85), {2: 0.5 / 0.95, 0: 0.3 / 0.95, 3: 0.15 / 0.95})
    assert_dist(filtered(top_p=0.3), {2: 1.0})  # the top token always stays
    # top-k then top-p on the renormalised top-k distribution (0.625, 0.375): before = 0, 0.625
    assert_dist(filtered(top_k=2, top_p=0.6), {2: 1.0})
    assert_dist(filtered(top_k=3, top_p=0.9), {2: 0.5 / 0.95, 0: 0.3 / 0.95, 3: 0.15 / 0.95})
    # top_k >= vocab is no filter
    assert_dist(filtered(top_k=9), PROBS)


def test_confidence_logprob_entropy_of_the_filtered_distribution():
    logits = jnp.broadcast_to(LOGITS, (6, 4))
    for key_seed in range(5):
        proposal = sample_tokens(logits, jax.random.key(key_seed), top_k=2, with_entropy=True)
        for token, conf, logprob, entropy in zip(*(np.asarray(x) for x in (
                proposal.tokens, proposal.confidence, proposal.logprob, proposal.entropy))):
            expected = {2: 0.625, 0: 0.375}[int(token)]
            assert conf == pytest.approx(expected, abs=1e-6)
            assert logprob == pytest.approx(math.log(expected), abs=1e-6)
            # -(0.625 ln 0.625 + 0.375 ln 0.375) = 0.661563
            assert entropy == pytest.approx(0.661563, abs=1e-5)
    greedy = sample_tokens(logits, jax.random.key(0), top_k=1, with_entropy=True)
    np.testing.assert_array_equal(greedy.tokens, 2)
    np.testing.assert_allclose(greedy.confidence, 1.0)
    np.testing.assert_allclose(greedy.logprob, 0.0)
    np.testing.assert_allclose(greedy.entropy, 0.0, atol=1e-7)
    plain = sample_tokens(logits, jax.random.key(0))
    np.testing.assert_array_equal(plain.entropy, 0.0)  # not asked for


@pytest.mark.parametrize("kwargs, expected", [
    (dict(), PROBS),
    (dict(top_k=2), {2: 0.625, 0: 0.375, 3: 0.0, 1: 0.0}),
    (dict(top_p=0.85), {2: 0.5 / 0.95, 0: 0.3 / 0.95, 3: 0.15 / 0.95, 1: 0.0}),
    (dict(temperature=0.5), {t: p * p / 0.365 for t, p in PROBS.items()}),  # .25+.09+.0225+.0025 = .365
])
def test_draw_frequencies_follow_the_filtered_distribution(kwargs, expected):
    draws = 40_000
    tokens = sample_tokens(jnp.broadcast_to(LOGITS, (draws, 4)), jax.random.key(11), **kwargs).tokens
    freq = np.bincount(np.asarray(tokens), minlength=4) / draws
    for token, p in expected.items():
        # 4.5 standard errors of a binomial frequency
        assert abs(freq[token] - p) <= 4.5 * math.sqrt(max(p * (1 - p), 1e-12) / draws) + 1e-9, (token, freq, expected)


def test_sequential_takes_first_masked_positions():
    masked = jnp.array([[False, True, True, False, True, True]])
    np.testing.assert_array_equal(sequential(masked, jnp.array([2])), [[False, True, True, False, False, False]])
    np.testing.assert_array_equal(sequential(masked, jnp.array([9])), masked)


def test_static_picks_most_confident_masked_with_position_ties():
    masked = jnp.array([[True, False, True, True, True]])
    confidence = jnp.array([[0.9, 0.99, 0.2, 0.7, 0.7]])  # position 1 is decoded: never picked
    np.testing.assert_array_equal(low_confidence_static(masked, confidence, jnp.array([2])),
                                  [[True, False, False, True, False]])
    np.testing.assert_array_equal(low_confidence_static(masked, confidence, jnp.array([3])),
                                  [[True, False, False, True, True]])
    # greedy: all confidences 1.0 -> lowest positions first
    ones = jnp.ones((1, 5))
    np.testing.assert_array_equal(low_confidence_static(masked, ones, jnp.array([2])),
                                  [[True, False, True, False, False]])


def test_quota_larger_than_masks_never_touches_decoded_or_prompt_positions():
    """Spec 10.11: the original's topk picked -inf (decoded / prompt-residual) positions here."""
    masked = jnp.array([[False, False, True, False], [False, False, False, False]])
    confidence = jnp.array([[0.9, 0.8, 0.1, 0.7], [0.5, 0.5, 0.5, 0.5]])
    entropy = jnp.array([[0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    quota = jnp.array([3, 3])
    proposal = strategies.Proposal(jnp.zeros((2, 4), jnp.int32), confidence, jnp.log(confidence), entropy)
    for strategy in strategies.STRATEGIES:
        chosen = select_transfer(strategy, masked, proposal, quota, dynamic_threshold=0.0, eb_threshold=10.0)
        np.testing.assert_array_equal(chosen, masked, err_msg=strategy)


def test_dynamic_threshold_is_strict_with_static_fallback():
    masked = jnp.array([[True, False, True, True, True]])
    confidence = jnp.array([[0.9, 0.99, 0.2, 0.7, 0.65]])
    one = jnp.array([1])
    np.testing.assert_array_equal(low_confidence_dynamic(masked, confidence, one, 0.6),
                                  [[True, False, False, True, True]])
    np.testing.assert_array_equal(low_confidence_dynamic(masked, confidence, one, 0.7),  # 0.7 is not > 0.7
                                  [[True, False, False, False, False]])
    np.testing.assert_array_equal(low_confidence_dynamic(masked, confidence, jnp.array([3]), 0.8),  # fallback
                                  [[True, False, False, True, True]])
    np.testing.assert_array_equal(low_confidence_dynamic(masked, confidence, one, 0.95),
                                  [[True, False, False, False, False]])


def test_dynamic_with_threshold_one_equals_static():
    key_c, key_m, key_q = jax.random.split(jax.random.key(3), 3)
    confidence = jax.random.uniform(key_c, (64, 8))
    masked = jax.random.bernoulli(key_m, 0.7, (64, 8))
    quota = jax.random.randint(key_q, (64,), 1, 5)
    np.testing.assert_array_equal(low_confidence_dynamic(masked, confidence, quota, 1.0),
                                  low_confidence_static(masked, confidence, quota))
    # greedy confidences are exactly 1.0: threshold 0.9 takes every masked position (spec 10.14)
    np.testing.assert_array_equal(low_confidence_dynamic(masked, jnp.ones((64, 8)), quota, 0.9), masked)


def test_entropy_bounded_by_hand():
    masked = jnp.array([[True, True, True, True, False]])
    entropy = jnp.array([[0.1, 0.3, 0.05, 0.2, 0.0]])  # ascending: pos 2, 0, 3, 1; cumulative .05 .15 .35 .65
    one = jnp.array([1])
    np.testing.assert_array_equal(entropy_bounded(masked, entropy, one, 0.3), [[True, False, True, False, False]])
    np.testing.assert_array_equal(entropy_bounded(masked, entropy, one, 0.4), [[True, False, True, True, False]])
    np.testing.assert_array_equal(entropy_bounded(masked, entropy, one, 0.01), [[False, False, True, False, False]])
    # at least the step's quota, lowest entropy first
    np.testing.assert_array_equal(entropy_bounded(masked, entropy, jnp.array([3]), 0.01),
                                  [[True, False, True, True, False]])
    # ties in entropy: lowest position first
    np.testing.assert_array_equal(entropy_bounded(masked, jnp.full((1, 5), 0.5), one, 0.1),
                                  [[True, False, False, False, False]])


def test_unknown_strategy_is_rejected():
    proposal = strategies.Proposal(*(jnp.zeros((1, 4)),) * 4)
    with pytest.raises(ValueError, match="remasking_strategy"):
        select_transfer("random", jnp.ones((1, 4), bool), proposal, jnp.array([1]))


# ----------------------------------------------------------------------------------------------
# The inverse-CDF draw (one uniform per position) against float64 probabilities
# ----------------------------------------------------------------------------------------------


def filtered_probs_f64(logits: np.ndarray, temperature=1.0, top_k=0, top_p=1.0) -> np.ndarray:
    """The filtered distribution of one row of logits, in float64 and written from the definition."""
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled[np.isfinite(scaled)].max())
    order = np.argsort(-scaled, kind="stable")
    keep = np.zeros(scaled.shape, bool)
    keep[order[: top_k or scaled.size]] = True
    probs = np.where(keep, probs, 0.0)
    probs /= probs.sum()
    if top_p < 1.0:
        sorted_probs = probs[order]
        before = np.cumsum(sorted_probs) - sorted_probs
        nucleus = np.zeros(scaled.shape, bool)
        nucleus[order[(before <= top_p) | (np.arange(scaled.size) == 0)]] = True
        probs = np.where(nucleus, probs, 0.0)
        probs /= probs.sum()
    return probs


@pytest.mark.parametrize("size, chunk", [(13, 256), (13, 4), (600, 256)])
def test_inverse_cdf_draw_lands_in_the_uniforms_float64_interval(size, chunk):
    """For a dense grid of uniforms, the drawn index i satisfies CDF(i-1) <= u < CDF(i) of the float64
    cumulative distribution (to 1e-6), zero-weight entries are never drawn, and u = 0 and u just
    below 1 give the first and last entries of positive weight."""
    rng = np.random.RandomState(size + chunk)
    weights = np.exp(rng.normal(0, 2, size))
    weights[[0, 3, size // 2, size - 1]] = 0.0  # zero weights at both ends and inside
    uniforms = np.concatenate([np.linspace(0.0, 1.0, 20_001, endpoint=False), [np.nextafter(np.float32(1), 0)]])
    drawn = np.asarray(strategies.inverse_cdf_draw(
        jnp.broadcast_to(jnp.asarray(weights, jnp.float32), (uniforms.size, size)),
        jnp.asarray(uniforms, jnp.float32), chunk=chunk))
    cdf = np.cumsum(weights) / weights.sum()
    below = np.where(drawn > 0, cdf[np.maximum(drawn - 1, 0)], 0.0)
    assert np.all(weights[drawn] > 0)
    assert np.all(below <= uniforms + 1e-6) and np.all(uniforms < cdf[drawn] + 1e-6)
    positive = np.flatnonzero(weights > 0)
    assert drawn[0] == positive[0] and drawn[-1] == positive[-1]


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    from scipy import stats

    support = probs > 0
    assert counts[~support].sum() == 0, "a token of probability 0 was drawn"
    expected = probs[support] * counts.sum()
    statistic = float(np.sum((counts[support] - expected) ** 2 / expected))
    return float(stats.chi2.sf(statistic, df=int(support.sum()) - 1))


@pytest.mark.parametrize("kwargs", [dict(), dict(top_k=5), dict(top_p=0.9, temperature=2.0)])
def test_sampled_frequencies_pass_chi_square_against_float64_softmax(kwargs):
    """100k draws over a random 11-token vocabulary (one logit -inf, as the mask token is) follow the
    float64 filtered softmax: chi-square p-value above 1e-4 (fails 1 run in 10,000 by chance)."""
    rng = np.random.RandomState(5)
    logits = rng.normal(0, 1.5, 11).astype(np.float32)
    logits[4] = -np.inf
    draws = 100_000
    use_top_p = kwargs.get("top_p", 1.0) < 1.0
    tokens = sample_tokens(jnp.broadcast_to(jnp.asarray(logits), (draws, 11)), jax.random.key(3),
                           use_top_p=use_top_p, **kwargs).tokens
    counts = np.bincount(np.asarray(tokens), minlength=11)
    assert chi_square_p_value(counts, filtered_probs_f64(logits, **kwargs)) > 1e-4


def test_logprobs_are_the_float64_log_probabilities_of_the_drawn_tokens():
    """Over a 600-token vocabulary (several CDF chunks): each drawn token's log-prob and confidence
    are its float64 filtered log-probability and probability."""
    rng = np.random.RandomState(8)
    logits = rng.normal(0, 3, (64, 600)).astype(np.float32)
    proposal = sample_tokens(jnp.asarray(logits), jax.random.key(1), temperature=0.7, top_p=0.9)
    for row, token, logprob, confidence in zip(logits, *(np.asarray(x) for x in (
            proposal.tokens, proposal.logprob, proposal.confidence))):
        probs = filtered_probs_f64(row, temperature=0.7, top_p=0.9)
        assert probs[token] > 0
        assert logprob == pytest.approx(math.log(probs[token]), abs=2e-5)
        assert confidence == pytest.approx(probs[token], rel=2e-5)


def test_a_rows_draw_depends_on_its_key_only():
    """Per-sequence determinism: a row's draw is the same alone or in any batch (keys are per row)."""
    rng = np.random.RandomState(2)
    logits = jnp.asarray(rng.normal(0, 1, (6, 4, 300)), jnp.float32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(9), i))(jnp.arange(6))
    batched = jax.vmap(lambda lg, key: sample_tokens(lg, key).tokens)(logits, keys)
    assert len(np.unique(np.asarray(batched))) > 6  # real draws, not a constant
    for row in (0, 3, 5):
        alone = sample_tokens(logits[row], keys[row]).tokens
        np.testing.assert_array_equal(alone, batched[row])
    subset = jax.vmap(lambda lg, key: sample_tokens(lg, key).tokens)(logits[jnp.array([5, 1])], keys[jnp.array([5, 1])])
    np.testing.assert_array_equal(subset, batched[jnp.array([5, 1])])

"""TraceRL rows, advantages and losses against hand-worked numbers."""

import jax.numpy as jnp
import numpy as np
import pytest

from tradojax.ops.masks import BlockAlignment
from tradojax.rl.advantages import difficulty_filter, group_zscore, outcome_token_rewards, trace_gae
from tradojax.rl.losses import kl_estimate, policy_loss, value_loss
from tradojax.training.row_masks import shrink_steps, trace_rounds

TRACE = np.array([2, 1, 1, 3, 5, 4])  # 6 generated tokens; b = 4, prompt of 4 (blocks agree)


def positions(mask):
    return np.flatnonzero(mask).tolist()


def test_trace_rounds_shrink_1_hand_worked():
    rounds = trace_rounds(TRACE, 6, response_length=8, prompt_length=4, block_size=4)
    assert [positions(r.trained) for r in rounds] == [[1, 2, 5], [0, 4], [3]]
    assert [positions(r.noisy) for r in rounds] == [[0, 1, 2, 3, 4, 5, 6, 7], [0, 3, 4, 6, 7], [3, 6, 7]]
    np.testing.assert_array_equal(rounds[0].steps, [2, 1, 1, 3, 5, 4, 6, 6])  # pads: max + 1


def test_trace_rounds_shrink_2_and_post_num():
    np.testing.assert_array_equal(shrink_steps(np.array([2, 1, 1, 3]), 2), [2, 2, 2, 3])
    np.testing.assert_array_equal(shrink_steps(np.array([7, 5, 9, 5, 8]), 2), [7, 7, 9, 7, 9])
    rounds = trace_rounds(TRACE, 6, response_length=8, prompt_length=4, block_size=4, shrink=2)
    assert [positions(r.trained) for r in rounds] == [[0, 1, 2, 4, 5], [3]]
    rounds = trace_rounds(TRACE, 6, response_length=8, prompt_length=4, block_size=4, post_num=1)
    assert [positions(r.trained) for r in rounds] == [[1, 2, 5], [0, 4], [3, 6]]  # the first pad (EOS slot)


def test_trace_rounds_ragged_blocks_follow_inference_alignment():
    """Prompt of 5 with b = 4: the first decode block holds 3 response tokens (positions 5-7),
    so training blocks are [0,1,2] [3,4,5,6] under INFERENCE alignment, [0..3] [4..6] originally."""
    trace = np.array([1, 2, 3, 4, 4, 5, 6])
    aligned = trace_rounds(trace, 7, response_length=7, prompt_length=5, block_size=4)
    assert [positions(r.trained) for r in aligned] == [[0, 3, 4], [1, 5], [2, 6]]
    original = trace_rounds(trace, 7, response_length=7, prompt_length=5, block_size=4,
                            alignment=BlockAlignment.ORIGINAL)
    assert [positions(r.trained) for r in original] == [[0, 4], [1, 5], [2, 6], [3]]


def test_every_token_is_trained_exactly_once():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 20))
        trace = np.sort(rng.integers(1, 12, size=n))
        rng.shuffle(trace)
        rounds = trace_rounds(trace, n, response_length=24, prompt_length=int(rng.integers(1, 9)),
                              block_size=4, shrink=int(rng.integers(1, 3)))
        counts = sum(r.trained.astype(int) for r in rounds)
        np.testing.assert_array_equal(counts[:n], 1)
        assert counts[n:].sum() == 0


def test_trace_rounds_bad_input():
    with pytest.raises(ValueError, match="1-based"):
        trace_rounds(np.array([0, 1]), 2, response_length=4, prompt_length=2, block_size=4)
    with pytest.raises(ValueError, match="trace has"):
        trace_rounds(np.array([1]), 2, response_length=4, prompt_length=2, block_size=4)


def test_group_zscore_and_difficulty_filter():
    correct = np.array([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 1]], float)
    z = group_zscore(correct)
    np.testing.assert_allclose(z[0], [1, -1, -1, 1])  # mean .5, population std .5
    np.testing.assert_allclose(z[1], 0)
    np.testing.assert_allclose(z[2], [-1 / np.sqrt(3)] * 3 + [np.sqrt(3)])
    np.testing.assert_array_equal(difficulty_filter(correct, 0.2, 0.8), [True, False, True])


def test_gae_special_cases_and_hand_numbers():
    steps = np.array([1, 1, 2, 3, 3, 9])
    trainable = np.array([1, 1, 1, 1, 1, 0], bool)
    values = np.array([0.1, 0.3, -0.2, 0.5, 0.7, 9.0])
    rewards = outcome_token_rewards(2.0, steps, trainable)
    np.testing.assert_array_equal(rewards, [0, 0, 0, 2, 2, 0])
    returns, adv = trace_gae(rewards, values, steps, trainable, 1.0, 1.0)
    np.testing.assert_allclose(returns[:5], 2.0)  # γ = λ = 1: R_j = R
    np.testing.assert_allclose(adv[:5], 2.0 - values[:5])  # A_j = R − V_j
    assert returns[5] == adv[5] == 0
    # γ = 1, λ = 0: A_j = r_j − V_j + V*_{k+1}
    _, adv0 = trace_gae(rewards, values, steps, trainable, 1.0, 0.0)
    np.testing.assert_allclose(adv0[:5], [0 - 0.1 - 0.2, 0 - 0.3 - 0.2, 0 + 0.2 + 0.6, 2 - 0.5, 2 - 0.7])
    # γ = 0.5, λ = 0.5 by hand: V* = [0.2, -0.2, 0.6], r* = [0, 0, 2]
    # A*_3 = 2 - .6 = 1.4; A*_2 = 0 + .2 + .5*.6 + .25*1.4 = .85
    returns, adv = trace_gae(rewards, values, steps, trainable, 0.5, 0.5)
    np.testing.assert_allclose(adv[:2], [-0.1 + 0.5 * -0.2 + 0.25 * 0.85, -0.3 + 0.5 * -0.2 + 0.25 * 0.85])
    np.testing.assert_allclose(returns[:5], [0.5, 0.5, 1.0, 2.0, 2.0])


def test_policy_loss_hand_computed():
    logp = jnp.array([[-1.0, -2.0, -0.5], [-0.3, -1.2, -4.0]])
    old = jnp.array([[-1.2, -1.5, -0.5], [-0.3, -1.0, -1.0]])
    adv = jnp.array([1.0, -2.0])
    mask = jnp.array([[1, 1, 0], [1, 1, 1]], bool)
    norm = jnp.array([3.0, 3.0])
    loss, metrics = policy_loss(logp, old, adv, mask, norm, clip_eps=0.2, beta=0.1)
    ratio = np.exp(np.array(logp - old))
    g = np.minimum(ratio * np.array([[1.0], [-2.0]]), np.clip(ratio, 0.8, 1.2) * np.array([[1.0], [-2.0]]))
    m = np.array(mask, float)
    pg = -np.mean((g * m).sum(1) / 3)
    d = np.array(logp - old)
    k3 = np.exp(-d) - 1 + d
    expected = pg + 0.1 * np.mean((k3 * m).sum(1) / 3)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # |ratio - 1| > .2: e^.2 = 1.22, e^-.5 = .61, e^-3 = .05 (e^-.2 = .82 is inside): 3 of 5 trained tokens
    assert float(metrics["clip_fraction"]) == pytest.approx(3 / 5)


def test_equal_policies_give_ratio_one_and_zero_kl():
    logp = jnp.array([[-1.0, -2.0], [-0.1, -3.0]])
    mask = jnp.ones((2, 2), bool)
    for estimator in ("k1", "k3"):
        loss, metrics = policy_loss(logp, logp, jnp.array([0.5, -1.0]), mask, jnp.array([2.0, 2.0]),
                                    clip_eps=0.2, beta=1.0, kl_estimator=estimator)
        assert float(metrics["kl"]) == 0.0 and float(metrics["ratio_mean"]) == 1.0
        assert float(loss) == pytest.approx(-np.mean([0.5 * 2 / 2, -1.0 * 2 / 2]))
    assert float(kl_estimate(jnp.array(-1.0), jnp.array(-1.5), "k3")) == pytest.approx(np.exp(-0.5) - 1 + 0.5)


def test_value_loss_clips():
    values = jnp.array([[1.0, 0.0]])
    old = jnp.array([[0.5, 0.0]])
    returns = jnp.array([[0.0, 1.0]])
    loss, _ = value_loss(values, old, returns, jnp.ones((1, 2), bool), jnp.array([2.0]), clip_eps=0.2)
    # token 0: max(1², (0.7)²) / 2 = .5; token 1: max(1, 1) / 2 = .5; sum 1 / 2
    assert float(loss) == pytest.approx(0.5)


def test_coupled_rows_are_complements_and_random_rows_match_spec():
    from tradojax.rl.methods import row_builder

    rng = np.random.default_rng(0)
    kwargs = dict(response_length=12, prompt_length=5, block_size=4, shrink=1, post_num=0,
                  alignment=BlockAlignment.INFERENCE, lower_p=0.1, upper_p=0.9)
    trace = np.arange(1, 10)
    first, second = row_builder("coupled")(trace, 9, rng=rng, **kwargs)
    np.testing.assert_array_equal(first.noisy, ~second.noisy)
    np.testing.assert_array_equal(first.trained | second.trained, np.arange(12) < 9)
    assert not (first.trained & second.trained).any()
    # random masking: marginally Bernoulli((lower + upper) / 2) per position
    rates = np.mean([row_builder("random_masking")(trace, 9, rng=rng, **kwargs)[0].noisy for _ in range(2000)], axis=0)
    np.testing.assert_allclose(rates, 0.5, atol=0.05)
    with pytest.raises(ValueError, match="unknown method 'grpo'"):
        row_builder("grpo")


def test_value_model_starts_from_the_policy_with_zero_values():
    import jax
    from helpers import TINY_MODEL
    from tradojax.models.transformer import init_model
    from tradojax.models.value import value_model_from_policy
    from tradojax.ops.masks import inference_segments

    policy = init_model(TINY_MODEL, seed=3)
    value = value_model_from_policy(policy)
    np.testing.assert_array_equal(value.backbone.layers.q_proj[...], policy.layers.q_proj[...])
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 512)
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    seg = inference_segments(pos, jnp.ones((2, 8), bool), 4)
    np.testing.assert_array_equal(value(tokens, pos, seg), 0.0)
    # the head is trainable: its gradient is the normed hidden state, non-zero
    from flax import nnx
    graphdef, state = nnx.split(value)
    grads = jax.grad(lambda s: nnx.merge(graphdef, s)(tokens, pos, seg).sum())(state)
    assert float(jnp.abs(grads["value_head"][...]).sum()) > 0


def test_trace_rounds_of_a_block_4_rollout_trained_at_block_8():
    """Block-size adaptation by RL (paper 5.8): rollouts at b = 4, TraceRL rows at b = 8. With an
    8-token prompt the response's 8 positions form one training block, which spans two decode
    blocks: its rounds are the distinct steps of both, in order."""
    rounds = trace_rounds(TRACE, 6, response_length=8, prompt_length=8, block_size=8)
    # steps [2, 1, 1, 3 | 5, 4] + pads (6): one round per step 1..5 (the pads' round trains nothing)
    assert [positions(r.trained) for r in rounds] == [[1, 2], [0], [3], [5], [4]]
    assert [positions(r.noisy) for r in rounds] == [[0, 1, 2, 3, 4, 5, 6, 7], [0, 3, 4, 5, 6, 7],
                                                     [3, 4, 5, 6, 7], [4, 5, 6, 7], [4, 6, 7]]
    # the same trace at b = 4 trains both decode blocks in each round: 3 rows instead of 5
    assert len(trace_rounds(TRACE, 6, response_length=8, prompt_length=8, block_size=4)) == 3


# ------------------------------------------------------------------ parity with the original (issue 14)


def test_a_generated_eos_equal_to_pad_is_a_pad_never_trained_with_post_num_0():
    """Spec 3.3: the original filters `input_ids == pad_id` out of p_mask (post_num = 0), and for TraDo
    EOS == pad, so the EOS is never trained; post_num = 1 trains it (the first pad). The EOS keeps its
    own step: it is masked in the noisy copies of its rounds like any token."""
    # TRACE's 6th token (position 5, step 4) is the EOS
    rounds = trace_rounds(TRACE, 6, response_length=8, prompt_length=4, block_size=4, ends_with_pad=True)
    assert [positions(r.trained) for r in rounds] == [[1, 2], [0, 4], [3]]
    assert [positions(r.noisy) for r in rounds] == [[0, 1, 2, 3, 4, 5, 6, 7], [0, 3, 4, 6, 7], [3, 6, 7]]
    rounds = trace_rounds(TRACE, 6, response_length=8, prompt_length=4, block_size=4, ends_with_pad=True,
                          post_num=1)
    assert [positions(r.trained) for r in rounds] == [[1, 2, 5], [0, 4], [3]]


def test_value_reward_lands_on_the_last_step_before_the_eos():
    """Sequential decoding (steps 1..6), the 6th token an EOS == pad: the outcome reward sits on the
    last trainable step, 5 (position 4), not on the EOS's step 6."""
    trace = np.arange(1, 7)
    rounds = trace_rounds(trace, 6, response_length=8, prompt_length=4, block_size=4, ends_with_pad=True)
    trainable = np.logical_or.reduce([r.trained for r in rounds])
    np.testing.assert_array_equal(outcome_token_rewards(1.5, rounds[0].steps, trainable), [0, 0, 0, 0, 1.5, 0, 0, 0])
    rounds = trace_rounds(trace, 6, response_length=8, prompt_length=4, block_size=4)  # an EOS != pad is trained
    trainable = np.logical_or.reduce([r.trained for r in rounds])
    np.testing.assert_array_equal(outcome_token_rewards(1.5, rounds[0].steps, trainable), [0, 0, 0, 0, 0, 1.5, 0, 0])


def test_step_rows_leave_a_pad_eos_out_of_the_loss():
    from tradojax.config import Config, SamplingConfig, TrainConfig
    from tradojax.rl.loop import build_step_rows

    config = Config(sampling=SamplingConfig(max_new_tokens=8), train=TrainConfig(batch_size=4))
    pad = config.model.pad_token_id
    rng = np.random.default_rng(0)
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    responses = [[40, 41, 42, pad], [43, 44, 45, 46, 47]]  # the first ends with EOS (== pad), the second is cut
    traces = [np.array([1, 2, 3, 4]), np.array([2, 1, 3, 4, 5])]
    step = build_step_rows(config, prompts, responses, traces, 4, rng)
    per_response = [[positions(m) for m, r in zip(step.rows.loss_mask, step.response[: step.num_real]) if r == i]
                    for i in (0, 1)]
    # the second response: block 1 (positions 0-3) steps 2, 1, 3, 4; block 2 starts with step 5
    assert per_response == [[[0], [1], [2]], [[1, 4], [0], [2], [3]]]
    config = Config(sampling=SamplingConfig(max_new_tokens=8), train=TrainConfig(batch_size=4, post_num=1))
    step = build_step_rows(config, prompts[:1], responses[:1], traces[:1], 4, rng)
    assert [positions(m) for m in step.rows.loss_mask[: step.num_real]] == [[0], [1], [2], [3]]


def test_loss_divisor_is_the_steps_longest_response_capped():
    """The original divides each row's sum by L1 = min(longest response of the step, max_gen_length):
    here rows are padded to 6 (max_new_tokens) and the longest kept response has 4 tokens."""
    from tradojax.config import Config, RLConfig, TrainConfig
    from tradojax.rl.loop import step_loss_scale

    config = Config(train=TrainConfig(max_response_len=2000))
    assert step_loss_scale(config, np.array([2, 4, 3]), 6) == pytest.approx(6 / 4)
    capped = Config(train=TrainConfig(max_response_len=3))
    assert step_loss_scale(capped, np.array([2, 4, 3]), 6) == pytest.approx(6 / 3)
    tokens = Config(train=TrainConfig(loss_normalization="tokens"))
    assert step_loss_scale(tokens, np.array([2, 4, 3]), 6) == 1.0
    original_gas = Config(rl=RLConfig(original_accumulation_steps=4))
    assert step_loss_scale(original_gas, np.array([2, 4, 3]), 6) == pytest.approx(6 / 4 / 4)

    # the loss with the scaled row weights equals the hand formula with L1 = 4
    rng = np.random.default_rng(1)
    logp = rng.uniform(-3, -0.1, size=(2, 6))
    old = logp + rng.normal(0, 0.3, size=(2, 6))
    adv = np.array([0.7, -1.3])
    mask = np.array([[1, 1, 0, 1, 0, 0], [0, 1, 1, 0, 0, 0]], bool)
    scale = step_loss_scale(config, np.array([2, 4, 3]), 6)
    loss, _ = policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                          jnp.full(2, 6.0), clip_eps=0.2, beta=0.01, row_weights=jnp.full(2, scale))
    ratio = np.exp(np.clip(logp - old, -10, 10))
    g = np.minimum(ratio * adv[:, None], np.clip(ratio, 0.8, 1.2) * adv[:, None])
    d = logp - old
    k3 = np.exp(np.clip(-d, -10, 10)) - 1 + d
    expected = -np.mean((g * mask).sum(1) / 4) + 0.01 * np.mean((k3 * mask).sum(1) / 4)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_update_batches_and_the_originals_partial_last_batch():
    """10 rows, batches of 4 (padded to 12): 3 updates, the last the mean over its 2 real rows; the
    original (DeepSpeed's accumulation boundary) does not apply that partial batch."""
    from tradojax.rl.loop import update_batches

    rows = np.arange(12)
    assert [b.tolist() for b in update_batches(rows, 4, 10, drop_partial=False)] == [[0, 1, 2, 3], [4, 5, 6, 7],
                                                                                     [8, 9, 10, 11]]
    assert [b.tolist() for b in update_batches(rows, 4, 10, drop_partial=True)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len(update_batches(rows, 4, 12, drop_partial=True)) == 3

"""Rows, the SFT loss against hand computation, micro-batching, and learning on a tiny model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import MICRO_MODEL
from tradojax.config import TrainConfig
from tradojax.models.transformer import init_model
from tradojax.ops.masks import BlockAlignment, MaskRule, NOISY
from tradojax.training.row_masks import random_mask
from tradojax.training.rows import pack_rows
from tradojax.training.step import make_optimizer, make_train_step, noisy_token_logprobs, sft_loss

CONFIG = MICRO_MODEL
MASK, PAD = 3, 0


def make_rows(seed, n=4, l0=6, l1=8, alignment=BlockAlignment.INFERENCE):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(4, 64, size=rng.integers(2, l0 + 1)) for _ in range(n)]
    responses = [rng.integers(4, 64, size=rng.integers(3, l1 + 1)) for _ in range(n)]
    noisy, trained = zip(*[random_mask(len(r), l1, lower_p=0.1, upper_p=0.9, post_num=0, rng=rng) for r in responses])
    return pack_rows(prompts, responses, noisy, trained, prompt_length=l0, response_length=l1,
                     pad_id=PAD, mask_id=MASK, block_size=4, alignment=alignment)


def test_pack_rows_layout():
    rows = make_rows(0)
    l0, l1 = 6, 8
    assert rows.tokens.shape == (4, l0 + 2 * l1)
    clean, noisy = rows.tokens[:, l0:l0 + l1], rows.tokens[:, l0 + l1:]
    np.testing.assert_array_equal(clean, rows.targets)
    assert (noisy[rows.loss_mask] == MASK).all()
    unmasked = noisy != MASK
    np.testing.assert_array_equal(noisy[unmasked], clean[unmasked])
    assert (rows.segments.kind[:, l0 + l1:] == NOISY).all()
    # pads never carry loss with post_num = 0
    assert not (rows.loss_mask & (rows.targets == PAD)).any()


def test_pack_rows_rejects_overlong_inputs():
    with pytest.raises(ValueError, match="row 0: prompt of 7 tokens exceeds prompt_length=6"):
        pack_rows([np.ones(7, int)], [np.ones(2, int)], [np.ones(8, bool)], [np.ones(8, bool)],
                  prompt_length=6, response_length=8, pad_id=0, mask_id=3, block_size=4)
    with pytest.raises(ValueError, match="trained position must be masked"):
        pack_rows([np.ones(2, int)], [np.ones(2, int)], [np.zeros(8, bool)], [np.ones(8, bool)],
                  prompt_length=6, response_length=8, pad_id=0, mask_id=3, block_size=4)


@pytest.mark.parametrize("alignment", list(BlockAlignment))
def test_sft_loss_matches_hand_computation_in_float64(alignment):
    """The loss equals −(1/B) Σ_rows (1/L1) Σ_masked log p, with log p from a float64 numpy
    softmax over the full model's logits at the noisy positions (dense mask)."""
    model = init_model(CONFIG, seed=3)
    rows = make_rows(1, alignment=alignment)
    loss, metrics = sft_loss(model, rows, None)
    logits = model(jnp.asarray(rows.tokens), jnp.asarray(rows.positions), rows.segments, MaskRule.BLOCK_DIFFUSION)
    l1 = rows.response_length
    noisy_logits = np.asarray(logits[:, -l1:], np.float64)
    log_probs = noisy_logits - np.log(np.exp(noisy_logits - noisy_logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - noisy_logits.max(-1, keepdims=True)
    picked = np.take_along_axis(log_probs, rows.targets[..., None], -1)[..., 0]
    expected = np.mean(-(picked * rows.loss_mask).sum(1) / l1)
    assert abs(float(loss) - expected) < 1e-5 * max(1.0, abs(expected))
    assert float(metrics["tokens"]) == rows.loss_mask.sum()


def test_noisy_rows_do_not_see_their_own_clean_block():
    """Changing a clean token of block k leaves the noisy log-probs of block k unchanged, and
    changes those of block k+1 (they are conditioned on clean earlier blocks)."""
    model = init_model(CONFIG, seed=5)
    rows = make_rows(2, n=1, l0=4, l1=8, alignment=BlockAlignment.ORIGINAL)
    base = np.asarray(noisy_token_logprobs(model, rows))
    tokens = rows.tokens.copy()
    tokens[0, 4 + 1] = (tokens[0, 4 + 1] + 7) % 60 + 4  # clean response token 1 (block 0)
    changed = np.asarray(noisy_token_logprobs(model, dataclasses.replace(rows, tokens=tokens)))
    np.testing.assert_allclose(changed[0, :4], base[0, :4], atol=1e-6)
    assert np.abs(changed[0, 4:] - base[0, 4:]).max() > 1e-4


def test_micro_batches_give_the_same_update():
    rows = make_rows(4, n=4)
    train = TrainConfig(steps=10, batch_size=4, learning_rate=1e-2, schedule="constant")
    results = []
    for micro in (1, 4):
        graphdef, params = nnx.split(init_model(CONFIG, seed=6))
        tx = make_optimizer(train)
        step = make_train_step(graphdef, tx, sft_loss, num_micro_batches=micro)
        params, _, metrics = step(params, tx.init(params), rows)
        results.append((params, metrics))
    (p1, m1), (p4, m4) = results
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
    # Adam's first update is about lr * sign(g): 1e-2 per weight; micro-batching agrees to 0.1% of it
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_block_sft_lowers_held_out_loss():
    """Learn 'response = prompt reversed': held-out loss falls well below its start."""
    rng = np.random.default_rng(0)

    def batch(seed, n):
        r = np.random.default_rng(seed)
        prompts = [r.integers(4, 20, size=4) for _ in range(n)]
        responses = [p[::-1].copy() for p in prompts]
        noisy, trained = zip(*[random_mask(4, 4, lower_p=0.1, upper_p=0.9, post_num=0, rng=r) for _ in range(n)])
        return pack_rows(prompts, responses, noisy, trained, prompt_length=4, response_length=4,
                         pad_id=PAD, mask_id=MASK, block_size=4)

    held_out = batch(12345, 32)
    train = TrainConfig(steps=150, batch_size=32, learning_rate=3e-3, schedule="constant")
    graphdef, params = nnx.split(init_model(CONFIG, seed=0))
    tx = make_optimizer(train)
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx, sft_loss)
    before = float(sft_loss(nnx.merge(graphdef, params), held_out, None)[0])
    for i in range(train.steps):
        params, opt_state, metrics = step(params, opt_state, batch(int(rng.integers(1 << 30)), 32))
    after = float(sft_loss(nnx.merge(graphdef, params), held_out, None)[0])
    assert after < 0.5 * before, (before, after)


def test_within_step_cosine_learning_rates_by_hand():
    from tradojax.training.step import within_step_cosine

    # horizon = updates + 1: cos(pi * u / 3) = 1, 0.5 -> rates 1, 0.75
    np.testing.assert_allclose(within_step_cosine(1.0, 2), [1.0, 0.75], rtol=1e-12)
    np.testing.assert_allclose(within_step_cosine(2e-6, 3), 2e-6 * np.array([1.0, (1 + np.sqrt(0.5)) / 2, 0.5]),
                               rtol=1e-12)


def test_host_learning_rate_sets_the_size_of_each_update():
    """Adam's first update moves every parameter by lr * g/|g| (+eps): setting the rate in the state
    before an update scales exactly that step."""
    from tradojax.training.step import with_learning_rate

    train = TrainConfig(learning_rate=1.0, max_grad_norm=0.0, eps=1e-12)
    tx = make_optimizer(train, host_learning_rate=True)
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(5,)), jnp.float32)}
    grads = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(5,)), jnp.float32)}
    for rate in (0.3, 0.05):
        state = with_learning_rate(tx.init(params), rate)
        updates, state = tx.update(grads, state, params)
        np.testing.assert_allclose(np.asarray(updates["w"]), -rate * np.sign(np.asarray(grads["w"])), rtol=1e-5)
    assert float(state[-1].hyperparams["learning_rate"]) == pytest.approx(0.05)


def test_noisy_token_entropy_against_float64_logits():
    """The entropy beside each noisy token's log-prob equals -sum p log p of that position's
    logits, computed in float64 from the model's own logits (tolerance 1e-4 nats)."""
    rows = make_rows(4, n=3)
    model = init_model(CONFIG, seed=2)
    logp, entropy = noisy_token_logprobs(model, rows, with_entropy=True)
    np.testing.assert_array_equal(np.asarray(logp), np.asarray(noisy_token_logprobs(model, rows)))
    response_length = rows.targets.shape[1]
    hidden = model.hidden_states(rows.tokens, rows.positions, rows.segments, MaskRule.BLOCK_DIFFUSION)
    logits = np.asarray(model.hidden_to_logits(hidden[:, -response_length:]), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    expected = -(np.exp(log_probs) * log_probs).sum(-1)
    np.testing.assert_allclose(np.asarray(entropy), expected, atol=1e-4, rtol=0)
    assert 0 < expected.min() and expected.max() <= np.log(CONFIG.vocab_size) + 1e-9

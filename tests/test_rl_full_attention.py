"""RL for full-attention models (LLaDA, Dream; spec 3.10 and 4): trace rows with shrinkage over the
whole response against hand-worked step maps, the random and coupled rows, the loss normalisation
(per-row token mean, KL summed) against hand-computed numbers, and short RLTrainer runs with
checkpoint and resume."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import config_path
from tradojax.config import ConfigError, load_config
from tradojax.data.tasks import load_tasks
from tradojax.models.loading import load_policy
from tradojax.rl.full_rows import full_row_builder
from tradojax.rl.loop import RLTrainer, build_step_rows, policy_loss_fn
from tradojax.rl.losses import policy_loss
from tradojax.training.rows import RowLayout
from tradojax.training.step import noisy_token_logprobs

# 7 generated tokens in a padded response of 9: the step at which each was unmasked (two tokens at
# step 1); the 2 pads take step max + 1 = 7
TRACE = np.array([2, 1, 1, 4, 3, 6, 5])
TOKENS, LENGTH = len(TRACE), 9


def positions(mask):
    return set(np.flatnonzero(mask).tolist())


# (noisy positions, trained positions) per row, worked by hand from TRACE
HAND = {
    # every step its own row; the pads' row (step 7) trains nothing and is dropped
    1: [({0, 1, 2, 3, 4, 5, 6, 7, 8}, {1, 2}), ({0, 3, 4, 5, 6, 7, 8}, {0}), ({3, 4, 5, 6, 7, 8}, {4}),
        ({3, 5, 6, 7, 8}, {3}), ({5, 6, 7, 8}, {6}), ({5, 7, 8}, {5})],
    # steps {1,2} -> 2, {3,4} -> 4, {5,6} -> 6, {7} -> 7
    2: [({0, 1, 2, 3, 4, 5, 6, 7, 8}, {0, 1, 2}), ({3, 4, 5, 6, 7, 8}, {3, 4}), ({5, 6, 7, 8}, {5, 6})],
    # the 7 distinct steps (pads included) form one group: one row trains the whole response
    8: [({0, 1, 2, 3, 4, 5, 6, 7, 8}, {0, 1, 2, 3, 4, 5, 6})],
}


@pytest.mark.parametrize("shrink", [1, 2, 8])
def test_tracerl_rows_follow_the_hand_worked_step_maps(shrink):
    build = full_row_builder("tracerl", mask_times_per_sample=1)
    rows = build(TRACE, TOKENS, response_length=LENGTH, prompt_length=5, block_size=4, shrink=shrink, post_num=0,
                 alignment=None, lower_p=0.1, upper_p=0.9, rng=None)
    assert [(positions(r.noisy), positions(r.trained)) for r in rows] == HAND[shrink]


def test_tracerl_rows_train_post_num_pads_and_not_an_eos_equal_to_pad():
    build = full_row_builder("tracerl", mask_times_per_sample=1)
    # post_num = 1: the first pad (step 7) is trained in a last row of its own
    rows = build(TRACE, TOKENS, response_length=LENGTH, shrink=1, post_num=1, rng=None)
    assert [(positions(r.noisy), positions(r.trained)) for r in rows][-1] == ({7, 8}, {7})
    # the last generated token is an EOS equal to the pad id: with post_num = 0 it is never trained
    rows = build(TRACE, TOKENS, response_length=LENGTH, shrink=1, post_num=0, rng=None, ends_with_pad=True)
    assert set().union(*(positions(r.trained) for r in rows)) == {0, 1, 2, 3, 4, 5}


@pytest.mark.parametrize("method,per_draw", [("random_masking", 1), ("coupled", 2)])
def test_random_and_coupled_rows_per_draw(method, per_draw):
    build = full_row_builder(method, mask_times_per_sample=5)
    rows = build(TRACE, TOKENS, response_length=LENGTH, post_num=0, lower_p=0.2, upper_p=0.8,
                 rng=np.random.default_rng(3))
    assert 5 <= len(rows) <= 5 * per_draw
    for row in rows:
        assert positions(row.trained) <= set(range(TOKENS))  # pads are never trained (post_num 0) ...
        assert {7, 8} <= positions(row.noisy)  # ... and always masked
        assert positions(row.trained) == positions(row.noisy) - {7, 8}
    if method == "coupled":  # a draw and its complement train every response token exactly once
        first, second = rows[0], rows[1]
        assert positions(first.trained) | positions(second.trained) == set(range(TOKENS))
        assert not positions(first.trained) & positions(second.trained)


def test_loss_is_a_per_row_token_mean_with_the_kl_summed_hand_computed():
    """One row, two trained tokens with log-ratios d = 0.1 and -0.3, advantage 1, clip 0.2, beta 0.01."""
    d = np.array([[0.1, -0.3, 0.0]])
    logp, old = jnp.asarray(d - 1.0), jnp.full((1, 3), -1.0)
    mask = jnp.array([[True, True, False]])
    loss, metrics = policy_loss(logp, old, jnp.ones(1), mask, jnp.array([2.0]), clip_eps=0.2, beta=0.01,
                                kl_normaliser=jnp.ones(1))
    # surrogates min(rho, clip(rho)): e^0.1 (inside the clip), e^-0.3 = 0.741 (below 0.8: the min keeps it)
    pg = -(math.exp(0.1) + math.exp(-0.3)) / 2
    kl = (math.exp(-0.1) - 1 + 0.1) + (math.exp(0.3) - 1 - 0.3)  # k3, summed over the row
    np.testing.assert_allclose(float(metrics["pg_loss"]), pg, rtol=1e-6)
    np.testing.assert_allclose(float(loss), pg + 0.01 * kl, rtol=1e-6)


def tiny_config(family: str, extra=()):
    return load_config(config_path("tiny.py"), [
        f"model.family={family}", "model.qk_norm=False", "model.num_layers=1", "model.hidden_size=32",
        "model.intermediate_size=64", "model.num_heads=2", "model.num_kv_heads=1",
        "rl.num_tasks_per_step=2", "rl.num_responses_per_task=2", "train.batch_size=4",
        "sampling.max_new_tokens=8", "sampling.prompt_buckets=[64]", "rl.difficulty_lower=0.0",
        "rl.difficulty_upper=1.0", "data.synthetic_train_size=40", "data.synthetic_eval_size=2",
        "rl.reward_workers=1", "train.learning_rate=1e-3", "train.schedule=constant", "rl.eval_every=100",
        "rl.save_every=1", "train.loss_normalization=tokens", "rl.shrink=2", *extra])


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_policy_loss_of_single_stream_rows_against_numpy(family, tokenizer):
    """The loop's loss on real rows of a tiny model: pg divided by each row's trained-token count,
    KL summed over the row, rows averaged (float64 numpy reference)."""
    config = tiny_config(family)
    model = load_policy(config)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 500, size=n) for n in (6, 9)]
    responses = [rng.integers(5, 500, size=n) for n in (8, 5)]
    traces = [rng.permutation(8) + 1, np.array([1, 1, 2, 3, 3])]
    step = build_step_rows(config, prompts, responses, traces, 16, rng)
    rows = step.rows
    assert rows.layout is RowLayout.SINGLE_STREAM and rows.tokens.shape[1] == 16 + 8
    logp = np.asarray(noisy_token_logprobs(model, rows), np.float64)
    old = logp + rng.normal(0, 0.3, logp.shape)
    adv = rng.normal(0, 1, len(rows))
    mask = rows.loss_mask
    loss, _ = policy_loss_fn(config)(model, rows, {"old_logp": jnp.asarray(old, jnp.float32),
                                                   "advantages": jnp.asarray(adv, jnp.float32)})
    ratio = np.exp(logp - old)
    surrogate = np.minimum(ratio * adv[:, None], np.clip(ratio, 0.8, 1.2) * adv[:, None])
    pg = -(surrogate * mask).sum(1) / np.maximum(mask.sum(1), 1)
    kl = ((np.exp(old - logp) - 1 + (logp - old)) * mask).sum(1)
    expected = np.mean((pg + config.rl.beta * kl) * rows.weights)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)


def test_value_model_is_refused_for_full_attention(tmp_path, tokenizer):
    config = tiny_config("llada", ["rl.value_model=True"])
    with pytest.raises(ConfigError, match="rl.value_model"):
        RLTrainer(config, load_policy(config), tokenizer, workdir=tmp_path, train_tasks=load_tasks(config.data, "train"))


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("family", ["llada", pytest.param("dream", marks=pytest.mark.slow)])
def test_tracerl_run_checkpoints_and_resumes(family, tmp_path, tokenizer):
    """Two TraceRL steps straight, and one step then a resumed second: the same parameters."""
    def trainer(name, steps):
        config = tiny_config(family, [f"rl.steps={steps}"])
        return RLTrainer(config, load_policy(config), tokenizer, workdir=tmp_path / name,
                         train_tasks=load_tasks(config.data, "train"))

    straight = trainer("straight", 2)
    history = straight.run()
    assert [m["step"] for m in history] == [1, 2]
    assert all(m["rows"] >= 4 and m["updates"] >= 1 for m in history)  # the rows of every shrunk step
    assert all(np.isfinite(m["pg_loss"]) and m["sampler_trainer_logp_gap"] < 0.5 for m in history)
    first = trainer("split", 1)
    first.run()
    resumed = trainer("split", 2)
    resumed.run(resume=True)
    assert resumed.step == 2
    for a, b in zip(leaves(straight.params), leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)


def test_demo_config_of_a_full_attention_family_keeps_the_overrides():
    """`tradojax demo --config.model.family=llada` takes the family's settings; other overrides still win;
    the default (SDAR) demo's config is untouched."""
    from tradojax import demo
    from tradojax.config import Config, apply_overrides, from_dict

    sdar = from_dict(Config, demo.default_config())
    assert sdar.rl.shrink == 1 and sdar.model.qk_norm and sdar.train.loss_normalization == "padded_length"
    config = demo.full_attention_config("llada")
    apply_overrides(config, ["model.family=llada", "rl.shrink=4"])
    config = from_dict(Config, config)
    assert config.model.family == "llada" and not config.model.qk_norm
    assert config.model.num_kv_heads == config.model.num_heads
    assert config.train.loss_normalization == "tokens" and config.rl.shrink == 4
    # the full-attention SFT: random masking on rows as long as the sampler's canvas, pads after an
    # answer trained (SFT and RL) so that an all-pad block ends a row; the SDAR demo keeps its own
    assert config.sft.mode == "random_masking" and config.sft.bucket_multiple == config.sampling.max_new_tokens
    assert config.warm_start.post_num == config.train.post_num == 8 > config.sampling.block_size
    assert config.warm_start.steps > sdar.warm_start.steps
    assert sdar.sft == type(sdar.sft)() and sdar.train.post_num == sdar.warm_start.post_num == 0


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_full_attention_demo_runs_sft_then_tracerl(family, tmp_path, capsys):
    from tradojax import cli

    out = tmp_path / "demo"
    code = cli.main(["demo", "--out", str(out), f"--config.model.family={family}", "--config.warm_start.steps=2",
                     "--config.rl.steps=2", "--config.data.synthetic_train_size=64",
                     "--config.data.synthetic_eval_size=4", "--config.rl.num_tasks_per_step=2",
                     "--config.rl.num_responses_per_task=2", "--config.eval.num_samples=1",
                     "--config.rl.eval_every=100"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"{family} model" in printed and "after TraceRL" in printed and "held-out accuracy" in printed
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["sft_steps"] == 2 and summary["rl_steps"] == 2
    assert 0 <= summary["accuracy_after_sft"] <= 1 and 0 <= summary["accuracy_after_rl"] <= 1
    assert json.loads((out / "hf" / "config.json").read_text())["model_type"].lower() == family

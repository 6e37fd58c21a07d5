"""The RL loop end to end on the tiny model: metrics, checkpoint/resume, SIGTERM, the value flow."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from tradojax.config import load_config
from tradojax.data.tasks import load_tasks
from tradojax.data.tokenizer import tokenizer_from_name
from tradojax.models.loading import load_policy
from tradojax.rl.loop import Preempted, RLTrainer

OVERRIDES = ["rl.num_tasks_per_step=2", "rl.num_responses_per_task=2", "train.batch_size=8",
             "sampling.max_new_tokens=8", "rl.difficulty_lower=0.0", "rl.difficulty_upper=1.0",
             "data.synthetic_train_size=40", "data.synthetic_eval_size=2", "rl.reward_workers=1",
             "train.learning_rate=1e-3", "train.schedule=constant", "rl.eval_every=100", "rl.save_every=1",
             # random init never answers: a tiny synthetic reward signal comes from the z-score of 0/1
             "sampling.temperature=1.0"]


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_from_name("tiny")


def make_trainer(tmp_path, tokenizer, extra=(), name="run"):
    config = load_config("configs/tiny.py", OVERRIDES + list(extra))
    return RLTrainer(config, load_policy(config), tokenizer, workdir=tmp_path / name,
                     train_tasks=load_tasks(config.data, "train"), eval_tasks=load_tasks(config.data, "eval"))


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_resume_after_sigterm_equals_an_uninterrupted_run(tmp_path, tokenizer):
    straight = make_trainer(tmp_path, tokenizer, ["rl.steps=2"], "straight")
    history = straight.run()
    assert [m["step"] for m in history] == [1, 2]
    for key in ("reward", "accuracy", "response_length", "tokens_per_step", "kl", "clip_fraction",
                "sampler_trainer_logp_gap", "rollout_s", "update_s"):
        assert key in history[0], key
    lines = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]

    # preempted after its first step: SIGTERM is honoured at the step boundary, with a save
    interrupted = make_trainer(tmp_path, tokenizer, ["rl.steps=2"], "interrupted")
    with pytest.raises(Preempted, match="saved step 1"):
        interrupted.run(on_step=lambda m: os.kill(os.getpid(), signal.SIGTERM))
    resumed = make_trainer(tmp_path, tokenizer, ["rl.steps=2"], "interrupted")
    resumed.run(resume=True)
    assert resumed.step == 2
    for a, b in zip(leaves(straight.params), leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(leaves(straight.opt_state), leaves(resumed.opt_state)):
        np.testing.assert_array_equal(a, b)


def test_value_model_flow_and_initial_reference(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, ["rl.steps=1", "rl.value_model=True", "rl.kl_reference=initial"])
    (metrics,) = trainer.run()
    assert "value_loss" in metrics and np.isfinite(metrics["value_loss"])
    assert "value_explained_variance" in metrics
    # the value head starts at zero and moves only where returns are non-zero
    head = np.asarray(trainer.value_params["value_head"][...])
    assert np.isfinite(head).all()


def test_trainer_recomputes_the_samplers_log_probs(tmp_path, tokenizer):
    """With temperature 1 and no filtering, the trainer's log-prob of each token in its TraceRL row
    equals the sampler's (inference-aligned blocks): the rows reproduce the decode states."""
    trainer = make_trainer(tmp_path, tokenizer, ["rl.steps=1"])
    (metrics,) = trainer.run()
    assert metrics["sampler_trainer_logp_gap"] < 0.05, metrics["sampler_trainer_logp_gap"]

"""The RL loop end to end on the tiny model: metrics, checkpoint/resume, SIGTERM, the value flow."""

import json
import os
import signal
import time

import jax
import numpy as np
import pytest

from helpers import config_path
from tradojax.config import load_config
from tradojax.data.tasks import load_tasks
from tradojax.models.loading import load_policy
from tradojax.rl import loop as rl_loop
from tradojax.rl.loop import Preempted, RLTrainer

OVERRIDES = ["rl.num_tasks_per_step=2", "rl.num_responses_per_task=2", "train.batch_size=8",
             "sampling.max_new_tokens=8", "rl.difficulty_lower=0.0", "rl.difficulty_upper=1.0",
             "data.synthetic_train_size=40", "data.synthetic_eval_size=2", "rl.reward_workers=1",
             "train.learning_rate=1e-3", "train.schedule=constant", "rl.eval_every=100", "rl.save_every=1",
             # random init never answers: a tiny synthetic reward signal comes from the z-score of 0/1
             "sampling.temperature=1.0"]


def make_trainer(tmp_path, tokenizer, extra=(), name="run", mesh=None):
    config = load_config(config_path("tiny.py"), OVERRIDES + list(extra))
    return RLTrainer(config, load_policy(config), tokenizer, workdir=tmp_path / name, mesh=mesh,
                     train_tasks=load_tasks(config.data, "train"), eval_tasks=load_tasks(config.data, "eval"))


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_resume_after_sigterm_equals_an_uninterrupted_run(tmp_path, tokenizer):
    straight = make_trainer(tmp_path, tokenizer, ["rl.steps=2"], "straight")
    history = straight.run()
    assert [m["step"] for m in history] == [1, 2]
    for key in ("reward", "accuracy", "response_length", "tokens_per_step", "kl", "clip_fraction",
                "sampler_trainer_logp_gap", "entropy", "rollout_s", "update_s"):
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


def test_phases_are_reported_in_order(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, ["rl.steps=1"])
    phases = []
    start = time.perf_counter()
    (metrics,) = trainer.run(on_phase=phases.append)
    elapsed = time.perf_counter() - start
    assert phases == ["rollout", "reward", "value", "update", "eval", "checkpoint"]
    # the phase clocks cover real work (sampling and the update take time) and fit inside the run
    timings = [metrics[f"{name}_s"] for name in ("rollout", "reward", "value", "update")]
    assert metrics["rollout_s"] > 0 and metrics["update_s"] > 0 and min(timings) >= 0
    assert sum(timings) <= elapsed


def test_value_model_flow_and_initial_reference(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, ["rl.steps=1", "rl.value_model=True", "rl.kl_reference=initial"])
    initial = [np.array(x) for x in leaves(trainer.params)]
    (metrics,) = trainer.run()
    assert "value_loss" in metrics and "value_explained_variance" in metrics
    # the value head starts at zero and moves exactly when the returns give it a loss
    head = np.asarray(trainer.value_params["value_head"][...])
    assert (np.abs(head).max() > 0) == (metrics["value_loss"] > 0)
    # the KL reference is a copy of the initial policy (not the donated live parameters), and the
    # update's KL against it is 0 up to rounding while the policy still equals it (no reward yet)
    for before, reference in zip(initial, leaves(trainer.ref_params)):
        np.testing.assert_array_equal(reference, before)
    assert not any(r is p for r, p in zip(jax.tree.leaves(trainer.ref_params), jax.tree.leaves(trainer.params)))
    assert metrics["updates"] >= 1 and abs(metrics["kl"]) < 1e-6


def test_trainer_recomputes_the_samplers_log_probs(tmp_path, tokenizer):
    """With temperature 1 and no filtering, the trainer's log-prob of each token in its TraceRL row
    equals the sampler's (inference-aligned blocks): the rows reproduce the decode states."""
    trainer = make_trainer(tmp_path, tokenizer, ["rl.steps=1"])
    (metrics,) = trainer.run()
    assert metrics["sampler_trainer_logp_gap"] < 0.05, metrics["sampler_trainer_logp_gap"]


@pytest.mark.slow
def test_rl_tiny_warm_starts_then_resumes_without_redoing_sft(tmp_path, capsys):
    """`tradojax rl --config configs/rl_tiny.py` (reduced): SFT warm start, RL, then --resume continues
    RL from its checkpoint and does not train the warm start again."""
    from tradojax import cli

    small = ["--config.warm_start.steps=4", "--config.warm_start.batch_size=8", "--config.train.batch_size=8",
             "--config.rl.num_tasks_per_step=2", "--config.rl.num_responses_per_task=2",
             "--config.data.synthetic_train_size=32", "--config.data.synthetic_eval_size=2",
             "--config.eval.num_samples=1", "--config.sampling.max_new_tokens=8"]
    workdir = tmp_path / "rl_tiny"
    args = ["rl", "--config", config_path("rl_tiny.py"), "--workdir", str(workdir), *small]
    assert cli.main(args + ["--config.rl.steps=2"]) == 0
    printed = capsys.readouterr().out
    assert "warm start: 4 SFT steps" in printed and "sft step    1" in printed
    sft_steps = [json.loads(line)["step"] for line in (workdir / "warm_start" / "sft_metrics.jsonl").read_text().splitlines()]
    assert sft_steps == [1, 2, 3, 4]
    rl_steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rl_steps == [1, 2]

    # a step logged after the last checkpoint (a run killed before its save) is redone, not listed twice
    with open(workdir / "metrics.jsonl", "a") as metrics_file:
        metrics_file.write(json.dumps({"step": 3, "lost": True}) + "\n")
    assert cli.main(args + ["--config.rl.steps=3", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resumed SFT" in printed and "sft step" not in printed.replace("resumed SFT", "")
    assert "resumed from" in printed
    assert len((workdir / "warm_start" / "sft_metrics.jsonl").read_text().splitlines()) == 4
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and not any("lost" in r for r in records)


def test_warm_start_needs_worked_solutions(tokenizer):
    from tradojax.config import ConfigError
    from tradojax.data.readers import MathTask
    from tradojax.sft.warm_start import warm_start_pairs

    with pytest.raises(ConfigError, match="warm_start: needs tasks with worked solutions"):
        warm_start_pairs(tokenizer, [MathTask(question="1+1?", ground_truth_answer="2")])


def test_sharded_rl_steps_equal_unsharded(tmp_path, tokenizer, monkeypatch):
    """Two TraceRL steps with the value model on a (data 4, fsdp 2) mesh of the 8 CPU devices: the
    same rollouts, rewards and updates as on one device; resuming on the mesh continues the run."""
    from jax.sharding import NamedSharding

    from tradojax.config import MeshConfig
    from tradojax.parallel.mesh import make_mesh

    # The random model earns reward 0 everywhere, and its zero-initialised value head predicts the
    # zero returns: no gradient at all, and Adam would turn the mesh's rounding (1e-10) into
    # lr-sized steps. Fixed +-1 advantages per response give both models a real signal.
    def alternating_advantages(scores):
        groups, k = scores.shape
        return np.tile(np.where(np.arange(k) % 2 == 0, 1.0, -1.0), (groups, 1))

    monkeypatch.setattr(rl_loop, "group_zscore", alternating_advantages)
    extra = ["rl.steps=2", "rl.value_model=True", "rl.value_learning_rate=1e-3"]
    single = make_trainer(tmp_path, tokenizer, extra, "single")
    initial = leaves(single.params) + leaves(single.value_params)
    single_history = single.run()
    assert all(h["grad_norm"] > 1e-3 and h["value_loss"] > 1e-3 for h in single_history), single_history
    mesh = make_mesh(MeshConfig(data=4, fsdp=2))
    sharded = make_trainer(tmp_path, tokenizer, extra, "sharded", mesh=mesh)
    sharded_history = sharded.run()
    for a, b in zip(single_history, sharded_history):
        for key in ("reward", "response_length", "tokens_per_step", "rows"):
            assert a[key] == b[key], key
        for key in ("kl", "clip_fraction", "grad_norm", "value_loss"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
    # The same updates up to the mesh's summation order: per leaf, the two runs differ by under 0.1% of
    # what the updates moved it. (Elementwise, Adam scales a near-zero gradient's rounding up to an
    # lr-sized step, so a few of 16k elements may differ by ~lr/40.)
    for i, (start, a, b) in enumerate(zip(initial, leaves(single.params) + leaves(single.value_params),
                                          leaves(sharded.params) + leaves(sharded.value_params))):
        moved, apart = np.linalg.norm(a - start), np.linalg.norm(a - b)
        assert apart <= 1e-3 * moved or apart == moved == 0, (i, a.shape, apart, moved)  # (0: unused, e.g.
        # the value model's LM head)
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=str(i))
    # the parameters and optimizer state live on the mesh, FSDP-split (not replicated copies)
    embed = jax.tree.leaves(sharded.params["embed_tokens"])[0]
    assert isinstance(embed.sharding, NamedSharding) and not embed.sharding.is_fully_replicated
    assert all(x.sharding.mesh == mesh for x in jax.tree.leaves(sharded.opt_state))
    resumed = make_trainer(tmp_path, tokenizer, ["rl.steps=3", *extra[1:]], "sharded", mesh=mesh)
    assert resumed.restore() and resumed.step == 2
    for a, b in zip(leaves(sharded.params), leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)
    resumed.run(resume=True)
    assert resumed.step == 3


def test_reset_cosine_reproduces_the_originals_per_step_learning_rates(tmp_path, tokenizer):
    from tradojax.training.step import within_step_cosine

    trainer = make_trainer(tmp_path, tokenizer, ["rl.steps=1", "rl.optimizer_per_step=reset_cosine",
                                                 "train.batch_size=4", "rl.epochs_per_step=2"])
    (metrics,) = trainer.run()
    updates = metrics["updates"]
    assert updates == 2 * -(-metrics["rows"] // 4) and updates >= 2
    expected = within_step_cosine(1e-3, updates)
    assert metrics["learning_rate"] == pytest.approx(expected.mean(), rel=1e-6)
    # the optimizer state ends at the last update's rate, with a fresh count (one step's updates)
    assert float(trainer.opt_state[-1].hyperparams["learning_rate"]) == pytest.approx(expected[-1], rel=1e-6)


@pytest.mark.slow
def test_block_size_adaptation_by_rl_rollouts_at_4_rows_at_8(tmp_path, tokenizer):
    """The paper's recipe (5.8): roll out at b = 4 while TraceRL trains b = 8 rows, then continue
    with rollouts at b = 8 from the checkpoint."""
    stage1 = make_trainer(tmp_path, tokenizer, ["rl.steps=1", "train.block_size=8"], "adapt")
    (metrics,) = stage1.run()
    assert metrics["updates"] >= 1 and np.isfinite(metrics["kl"])
    assert stage1.sampling.block_size == 4
    stage2 = make_trainer(tmp_path, tokenizer, ["rl.steps=2", "train.block_size=8", "sampling.block_size=8",
                                                "sampling.denoising_steps=8"], "adapt")
    history = stage2.run(resume=True)
    assert [m["step"] for m in history] == [1, 2] and stage2.sampling.block_size == 8
    # rows at b = 8 from b = 8 rollouts reproduce the sampler's log-probs again
    assert history[-1]["sampler_trainer_logp_gap"] < 0.05


def test_value_model_fits_learnable_returns():
    """The value model (policy backbone + zero head) and its clipped loss learn returns that the
    rows determine (here: the parity of the first prompt token): explained variance from 0 to > 0.8."""
    import jax.numpy as jnp
    from flax import nnx

    from helpers import TINY_MODEL
    from tradojax.config import Config, TrainConfig
    from tradojax.models.transformer import init_model
    from tradojax.models.value import value_model_from_policy
    from tradojax.rl.loop import _value_loss_fn, _values
    from tradojax.training.row_masks import random_mask
    from tradojax.training.rows import pack_rows
    from tradojax.training.step import make_optimizer, make_train_step

    config = Config(train=TrainConfig(learning_rate=1e-3, schedule="constant"))
    graphdef, params = nnx.split(value_model_from_policy(init_model(TINY_MODEL, seed=0)))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 500, size=8) for _ in range(16)]
    responses = [rng.integers(4, 500, size=16) for _ in range(16)]
    noisy, trained = zip(*[random_mask(16, 16, lower_p=0.3, upper_p=0.9, post_num=0, rng=rng) for _ in range(16)])
    rows = jax.tree.map(jnp.asarray, pack_rows(prompts, responses, noisy, trained, prompt_length=8,
                                               response_length=16, pad_id=0, mask_id=3, block_size=4))
    returns = np.where(np.array([p[0] % 2 for p in prompts]) == 0, 1.0, -1.0)[:, None] * np.ones((16, 16))
    mask = np.asarray(rows.loss_mask)

    def explained_variance():
        values = np.asarray(_values(graphdef, params, rows))
        return 1 - (returns[mask] - values[mask]).var() / returns[mask].var()

    assert abs(explained_variance()) < 1e-6  # the zero head predicts 0 everywhere
    tx = make_optimizer(config.train)
    step = make_train_step(graphdef, tx, _value_loss_fn(config))
    opt_state = tx.init(params)
    for _ in range(20):
        old_values = _values(graphdef, params, rows)
        params, opt_state, _ = step(params, opt_state, rows,
                                          {"old_values": old_values, "returns": jnp.asarray(returns, jnp.float32)})
    assert explained_variance() > 0.8


def test_batch_size_must_split_over_the_data_parallel_devices(tmp_path, tokenizer):
    from tradojax.config import ConfigError, MeshConfig
    from tradojax.parallel.mesh import make_mesh

    with pytest.raises(ConfigError, match="train.batch_size=4 .* data-parallel size 8"):
        make_trainer(tmp_path, tokenizer, ["train.batch_size=4"], mesh=make_mesh(MeshConfig(data=8)))


# ------------------------------------------------------------------ parity with the original (issue 14)


def test_value_model_trains_on_the_originals_1_based_steps(tmp_path, tokenizer):
    """The original trains the value model when `current_epoch % train_value_every == 0`, epochs
    counted from 1: with every = 2, at step 2 and not at step 1."""
    trainer = make_trainer(tmp_path, tokenizer, ["rl.steps=2", "rl.value_model=True", "rl.train_value_every=2"])
    first, second = trainer.run()
    assert "value_loss" not in first and np.isfinite(second["value_loss"])


def test_prompts_longer_than_max_prompt_len_are_not_trained(tmp_path, tokenizer):
    """Step 1 draws two tasks; one gets a longer question. With train.max_prompt_len at the short
    prompt's length, that task's 2 responses are rolled out but not trained."""
    import dataclasses

    config = load_config(config_path("tiny.py"), OVERRIDES + ["rl.steps=1"])
    tasks = load_tasks(config.data, "train")
    probe = RLTrainer(config, load_policy(config), tokenizer, workdir=tmp_path / "probe", train_tasks=tasks)
    short_index, long_index = probe.task_sampler.step_tasks(0).task_indices[:2]
    assert short_index != long_index
    tasks[long_index] = dataclasses.replace(tasks[long_index], question=tasks[long_index].question + " Think twice.")
    limit = len(probe.prompt_ids(short_index, tasks[short_index]))
    assert len(probe.prompt_ids(-1, tasks[long_index])) > limit
    config = load_config(config_path("tiny.py"), OVERRIDES + ["rl.steps=1", f"train.max_prompt_len={limit}"])
    trainer = RLTrainer(config, load_policy(config), tokenizer, workdir=tmp_path / "run", train_tasks=tasks)
    (metrics,) = trainer.run()
    assert metrics["dropped_long_prompts"] == 2 and metrics["updates"] >= 1
    kept = {len(p) for p in trainer._prompt_cache.values()}
    assert max(kept) > limit  # the long prompt was rolled out


def test_rl_prompts_follow_data_strip_final_newline(tmp_path, tokenizer):
    from tradojax.data.templates import math_prompt

    trainer = make_trainer(tmp_path, tokenizer, ["data.strip_final_newline=True"])
    task = trainer.train_tasks[0]
    stripped = math_prompt(tokenizer, task.question, strip_final_newline=True)
    assert stripped.text.endswith("<|im_start|>assistant")
    assert trainer.prompt_ids(0, task) == list(stripped.token_ids)
    assert list(stripped.token_ids) != list(math_prompt(tokenizer, task.question).token_ids)


def test_eval_applies_no_truncation_penalty_unless_asked(monkeypatch, tokenizer):
    """The original's eval accuracy is the raw correctness: a right answer that fills the whole
    generation budget counts (accuracy 1); `eval.truncation_penalty=True` scores it 0, as RL does."""
    import dataclasses as dc

    from tradojax import evaluation
    from tradojax.config import Config, EvalConfig, SamplingConfig
    from tradojax.data.readers import MathTask

    answer = tokenizer.encode("so \\boxed{4}", add_special_tokens=False)

    class FakeRollout:
        def __init__(self, rows):
            self.prompt_index = np.repeat(np.arange(rows // 2), 2)
            self.lengths = np.full(rows, len(answer))
            self.num_steps = np.full(rows, len(answer))

        def to_numpy(self):
            return self

        def responses(self):
            return [list(answer)] * len(self.lengths)

    class FakeSampler:
        def __init__(self, model, sampling, mesh=None):
            self.sampling = sampling

        def generate(self, prompts, **kwargs):
            return FakeRollout(len(prompts) * self.sampling.num_samples)

    monkeypatch.setattr(evaluation, "sampler_for", FakeSampler)
    config = Config(sampling=SamplingConfig(max_new_tokens=len(answer)),
                    eval=EvalConfig(strategies=("low_confidence_static",), top_k=(1,), num_samples=2))
    tasks = [MathTask(question="2 + 2?", ground_truth_answer="4")]
    (plain,) = evaluation.evaluate(None, tokenizer, tasks, config)
    assert plain.accuracy == 1.0
    penalised = dc.replace(config, eval=dc.replace(config.eval, truncation_penalty=True))
    (result,) = evaluation.evaluate(None, tokenizer, tasks, penalised)
    assert result.accuracy == 0.0

"""The run-loop shell SFT and RL share (training/run_loop.py): scheduling, SIGTERM, resume past a
damaged step, the batch check. A trivial step body (no model) for the shell itself; one small SFT
run for the damaged-checkpoint resume of a real trainer."""

import json
import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import config_path

from tradojax.checkpoint import COMMIT_MARKER
from tradojax.config import ConfigError, MeshConfig, TrainConfig, load_config
from tradojax.data.tokenizer import tokenizer_from_name
from tradojax.models.transformer import init_model
from tradojax.parallel.mesh import make_mesh
from tradojax.sft.data import synthetic_sft_pairs
from tradojax.sft.trainer import SFTTrainer
from tradojax.training.run_loop import Preempted, RunLoop, check_batch_fits_mesh


class Counter:
    """A trainer in miniature: its state is a random vector, each step one deterministic update."""

    def __init__(self, workdir, log=lambda _: None):
        self.loop = RunLoop(workdir, log=log, label="toy", metrics_file="toy.jsonl")
        self.params = {"w": jax.random.normal(jax.random.key(3), (5,))}
        self.step = 0
        self.history: list[dict] = []
        self.evaluated_at: list[int] = []

    def train_step(self, resources) -> dict:
        self.params = {"w": self.params["w"] * 0.75 + jnp.sin(self.step + 1.0)}
        self.step += 1
        return {"step": self.step, "w0": float(self.params["w"][0]), "resources": resources}

    def evaluate(self, resources) -> dict:
        self.evaluated_at.append(self.step)
        return {"eval/norm": float(jnp.linalg.norm(self.params["w"]))}

    def save(self) -> None:
        self.loop.save(self.step, {"params": self.params}, {"step": self.step, "history": self.history})

    def restore(self) -> bool:
        restored = self.loop.restore({"params": self.params})
        if restored is None:
            return False
        _, trees, meta = restored
        self.params, self.step, self.history = trees["params"], meta["step"], list(meta["history"])
        return True


def expected_w(steps: int) -> np.ndarray:
    w = np.asarray(jax.random.normal(jax.random.key(3), (5,)), np.float64)
    for step in range(steps):
        w = w * 0.75 + np.sin(step + 1.0)
    return w


def test_schedule_metrics_and_resources(tmp_path):
    trainer = Counter(tmp_path)
    phases, reported = [], []

    class Pool:
        def __enter__(self):
            return "pool"

        def __exit__(self, *exc):
            phases.append("pool closed")

    history = trainer.loop.run(trainer, steps=7, save_every=3, eval_every=2, resources=Pool,
                               on_step=reported.append, on_phase=phases.append)
    assert [r["step"] for r in history] == list(range(1, 8)) and reported == history
    assert {r["resources"] for r in history} == {"pool"}
    assert trainer.evaluated_at == [2, 4, 6, 7]  # every 2 steps and the last
    assert trainer.loop.checkpointer.all_steps() == [3, 6, 7]  # every 3 steps and the last
    assert phases == ["eval", "checkpoint", "eval", "eval", "checkpoint", "eval", "checkpoint", "pool closed"]
    np.testing.assert_allclose(np.asarray(trainer.params["w"]), expected_w(7), rtol=1e-5)
    lines = (tmp_path / "toy.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 8))
    assert all(r["step_s"] > 0 for r in history)


def test_sigterm_saves_the_step_and_resume_continues_bit_exact(tmp_path):
    straight = Counter(tmp_path / "straight")
    straight.loop.run(straight, steps=5, save_every=0, eval_every=0)

    messages, handler_before = [], signal.getsignal(signal.SIGTERM)
    first = Counter(tmp_path / "run", log=messages.append)
    kill_at_2 = lambda r: os.kill(os.getpid(), signal.SIGTERM) if r["step"] == 2 else None  # noqa: E731
    with pytest.raises(Preempted, match="SIGTERM: saved toy step 2"):
        first.loop.run(first, steps=5, save_every=0, eval_every=0, on_step=kill_at_2)
    assert first.loop.checkpointer.all_steps() == [2] and first.step == 2
    assert any("SIGTERM received" in m for m in messages)
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the previous handler is back

    second = Counter(tmp_path / "run", log=messages.append)
    second.loop.run(second, steps=5, save_every=0, eval_every=0, resume=True)
    assert any(m.startswith("resumed toy from") and "(step 2)" in m for m in messages), messages
    assert second.step == 5 and [r["step"] for r in second.history] == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(np.asarray(second.params["w"]), np.asarray(straight.params["w"]))


def test_resume_skips_a_damaged_latest_step(tmp_path):
    trainer = Counter(tmp_path)
    trainer.loop.run(trainer, steps=3, save_every=1, eval_every=0)
    os.remove(tmp_path / "checkpoints" / "3" / COMMIT_MARKER)  # a partly copied step 3

    messages = []
    resumed = Counter(tmp_path, log=messages.append)
    assert resumed.restore() and resumed.step == 2
    assert any("skipping damaged step 3" in m for m in messages), messages
    np.testing.assert_allclose(np.asarray(resumed.params["w"]), expected_w(2), rtol=1e-5)
    resumed.loop.run(resumed, steps=4, save_every=1, eval_every=0)
    assert resumed.loop.checkpointer.all_steps()[-2:] == [3, 4]
    np.testing.assert_allclose(np.asarray(resumed.params["w"]), expected_w(4), rtol=1e-5)


def test_a_loop_off_the_main_thread_runs_without_a_signal_handler(tmp_path):
    """signal.signal works in the main thread only: the shell leaves SIGTERM alone elsewhere."""
    trainer, errors = Counter(tmp_path), []

    def run():
        try:
            trainer.loop.run(trainer, steps=2, save_every=0, eval_every=0)
        except Exception as err:  # reported below
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert not errors and trainer.step == 2


def test_batch_must_split_over_the_data_axes():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    check_batch_fits_mesh(TrainConfig(batch_size=8, micro_batch_size=4), mesh)
    with pytest.raises(ConfigError, match="train.batch_size=6 .* data-parallel size 4"):
        check_batch_fits_mesh(TrainConfig(batch_size=6), mesh)
    with pytest.raises(ConfigError, match="data-parallel size 4"):
        check_batch_fits_mesh(TrainConfig(batch_size=8, micro_batch_size=2), mesh)


def test_sft_resume_skips_a_damaged_checkpoint_and_ends_as_the_uninterrupted_run(tmp_path):
    """A damaged SFT checkpoint (the latest step) is skipped with a message; training continues
    from the step before and ends on the same parameters as an uninterrupted run."""
    config = load_config(config_path("sft_tiny.py"), ["train.batch_size=8", "train.learning_rate=3e-3",
                                                      "train.schedule=constant", "train.warmup_steps=0",
                                                      "model.num_layers=1", "train.steps=4"])
    pairs, _ = synthetic_sft_pairs(16, config, tokenizer_from_name(config.tokenizer))
    graphdef, params = nnx.split(init_model(config.model, seed=0))

    def trainer(name, log=lambda _: None):
        return SFTTrainer(config, nnx.merge(graphdef, jax.tree.map(jnp.copy, params)), pairs,
                          workdir=tmp_path / name, log=log)

    def crash(record):
        if record["step"] == 4:
            raise RuntimeError("host lost")

    first = trainer("run")  # its parameters after step 4 are the uninterrupted run's
    with pytest.raises(RuntimeError, match="host lost"):
        first.run(save_every=1, on_step=crash)  # steps 1-3 saved, 4 lost
    assert first.step == 4 and first.loop.checkpointer.all_steps() == [1, 2, 3]
    step_3 = tmp_path / "run" / "checkpoints" / "3"
    data_file = max((os.path.join(root, f) for root, _, names in os.walk(step_3 / "policy") for f in names),
                    key=os.path.getsize)
    with open(data_file, "r+b") as f:
        f.truncate(os.path.getsize(data_file) // 3)

    messages = []
    resumed = trainer("run", log=messages.append)
    history = resumed.run(resume=True, save_every=1)
    assert any(f"skipping damaged step 3 in {step_3}" in m for m in messages), messages
    assert any("resumed SFT from" in m and "(step 2)" in m for m in messages), messages
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    assert [r["loss"] for r in history] == [r["loss"] for r in first.history]
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(p.startswith("3.damaged-") for p in os.listdir(tmp_path / "run" / "checkpoints"))

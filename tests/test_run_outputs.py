"""A run's output is a model: a short `tradojax rl` run on the tiny config exports itself with
`--export-hf` (policy and value model), the export loads in `transformers` with the trainer's
logits, and `export-hf`, `sample` and `eval` read the run directory itself (damaged steps skipped).
Those are slow (a real run); the fast lane reads steps saved by hand as the trainers save them."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import build_once, config_path
from tradojax import cli
from tradojax.checkpoint import COMMIT_MARKER, CheckpointError, TrainCheckpointer
from tradojax.config import load_config, to_dict
from tradojax.models import hf
from tradojax.models.loading import load_model
from tradojax.models.transformer import apply, init_model
from tradojax.ops import masks

TOLERANCE = 1e-5  # max |logit (value) difference| in float32; logits and values are O(1..10)
TINY_RL = ["--config", config_path("rl_tiny.py"), "--config.warm_start.steps=2", "--config.warm_start.batch_size=8",
           "--config.rl.steps=1", "--config.rl.num_tasks_per_step=2", "--config.rl.num_responses_per_task=2",
           "--config.train.batch_size=8", "--config.sampling.max_new_tokens=8", "--config.rl.reward_workers=1",
           "--config.data.synthetic_train_size=40", "--config.data.synthetic_eval_size=2",
           "--config.eval.num_samples=1", "--config.rl.difficulty_lower=0.0", "--config.rl.difficulty_upper=1.0"]


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory):
    """(run directory, export directory) of `tradojax rl --export-hf` with the value model on (one
    run shared by the xdist workers)."""
    def build(root):
        code = cli.main(["rl", *TINY_RL, "--config.rl.value_model=True", "--workdir", str(root / "run"),
                         "--export-hf", str(root / "export")])
        assert code == 0

    root = build_once(tmp_path_factory, "rl_run", build)
    return root / "run", root / "export"


def flat(state) -> dict[str, np.ndarray]:
    return {".".join(map(str, path)): np.asarray(leaf[...]) for path, leaf in nnx.to_flat_state(state)}


def block_causal_batch(seed: int, batch=2, length=11, block_size=4):
    tokens = np.random.default_rng(seed).integers(4, 500, (batch, length)).astype(np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    segments = masks.inference_segments(jnp.asarray(positions), jnp.ones((batch, length), bool), block_size)
    dense = np.asarray(masks.dense_mask(masks.MaskRule.BLOCK_DIFFUSION, segments, segments, self_attention=True))
    return tokens, positions, segments, dense


@pytest.mark.slow
def test_rl_export_loads_in_transformers_with_the_trainers_logits(rl_run):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    run, export = rl_run
    trained = load_model(run, with_value=True, log=lambda _: None)  # the final step the trainer saved
    assert trained.value is not None and trained.source.startswith(f"step 1 of {run}")
    # the export holds exactly the trained weights, its config the trained model's
    exported, config = hf.load_hf_model(export)
    assert config == trained.policy.config
    ours, theirs = flat(nnx.state(trained.policy, nnx.Param)), flat(nnx.state(exported, nnx.Param))
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    assert (export / "tokenizer.json").is_file()

    loaded = transformers.AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    assert loaded.dtype == torch.float32
    tokens, positions, segments, dense = block_causal_batch(seed=0)
    graphdef, params = nnx.split(trained.policy)
    logits = np.asarray(apply(graphdef, params, jnp.asarray(tokens), jnp.asarray(positions), segments))
    with torch.no_grad():
        hf_logits = loaded(input_ids=torch.from_numpy(tokens).long(),
                           attention_mask=torch.from_numpy(dense.copy())[:, None]).logits.numpy()
    diff = np.abs(logits - hf_logits).max()
    print(f"rl export in transformers: max |logit diff| = {diff:.2e} (logits up to {np.abs(logits).max():.1f})")
    assert diff < TOLERANCE and np.abs(logits).std() > 0.05  # the weights matter

    # the value model: backbone + value_head.weight [1, hidden], as the original keeps it
    value_back = hf.load_hf_value_model(export / "value")
    ours, theirs = flat(nnx.state(trained.value)), flat(nnx.state(value_back))
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    backbone = transformers.AutoModelForCausalLM.from_pretrained(export / "value", trust_remote_code=True).eval()
    head = torch.from_numpy(np.array(trained.value.value_head[...]))
    values = np.asarray(trained.value(jnp.asarray(tokens), jnp.asarray(positions), segments))
    with torch.no_grad():
        hidden = backbone.model(input_ids=torch.from_numpy(tokens).long(),
                                attention_mask=torch.from_numpy(dense.copy())[:, None]).last_hidden_state
    assert np.abs(values - (hidden @ head).numpy()).max() < TOLERANCE


@pytest.mark.slow
def test_export_hf_reads_the_run_skipping_a_damaged_step(rl_run, tmp_path, capsys):
    run, export = rl_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    steps = copy / "checkpoints"
    shutil.copytree(steps / "1", steps / "2")  # a newer step copied without its commit marker
    (steps / "2" / COMMIT_MARKER).unlink()

    assert cli.main(["export-hf", str(copy), str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert f"skipping damaged step 2 in {steps / '2'}" in captured.err
    assert f"exported step 1 of {copy}" in captured.out and "value model ->" in captured.out
    for name in ("model.safetensors", "value/model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "out" / name).read_bytes() == (export / name).read_bytes(), name
    assert sorted(p.name for p in steps.iterdir()) == ["1", "2"]  # nothing moved

    # a named step must be intact; a step folder is a model too; --no-value leaves the value out
    assert cli.main(["export-hf", str(copy), str(tmp_path / "bad"), "--step", "2"]) == 2
    assert f"{steps / '2'} has no {COMMIT_MARKER}" in capsys.readouterr().err
    assert cli.main(["export-hf", str(steps / "1"), str(tmp_path / "one"), "--no-value"]) == 0
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (export / "model.safetensors").read_bytes()
    assert not (tmp_path / "one" / "value").exists()


@pytest.mark.slow
def test_sample_and_eval_read_the_run_directory(rl_run, tmp_path, capsys):
    run, export = rl_run
    outputs = {}
    for name, source in (("run", run), ("export", export)):
        out = tmp_path / f"{name}.jsonl"
        code = cli.main(["sample", "--config", config_path("rl_tiny.py"), f"--config.hf_checkpoint={source}",
                         "--config.sampling.max_new_tokens=8", "--prompt", "Which is largest: 3 7 1 2?",
                         "--seed", "1", "--no-progress", "--output", str(out)])
        assert code == 0
        outputs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert "random weights" not in capsys.readouterr().err
    # the run directory and its export are the same model: the same seed samples the same tokens
    assert len(outputs["run"]) == 1 and outputs["run"][0]["token_ids"] == outputs["export"][0]["token_ids"]

    results = tmp_path / "eval.json"
    code = cli.main(["eval", *TINY_RL[:2], f"--config.hf_checkpoint={run}", "--config.sampling.max_new_tokens=8",
                     "--config.data.synthetic_eval_size=2", "--config.eval.num_samples=1",
                     "--config.rl.reward_workers=1", "--out", str(results)])
    assert code == 0
    (result,) = json.loads(results.read_text())["results"]
    assert result["num_tasks"] == 2 and 0 < result["mean_length"] <= 8


@pytest.mark.slow
def test_sft_export_and_export_hf_of_the_run_agree(tmp_path, capsys):
    """`tradojax sft --export-hf` and `tradojax export-hf RUN` write the same model, block-size
    adaptation included (the step records the adapted model config)."""
    workdir, direct, later = tmp_path / "run", tmp_path / "direct", tmp_path / "later"
    code = cli.main(["sft", "--config", config_path("sft_tiny.py"), "--synthetic", "16", "--config.train.steps=1",
                     "--config.train.block_size=8", "--workdir", str(workdir), "--export-hf", str(direct)])
    assert code == 0
    assert cli.main(["export-hf", str(workdir), str(later)]) == 0
    assert json.loads((direct / "config.json").read_text())["block_size"] == 8
    for name in ("model.safetensors", "config.json"):
        assert (direct / name).read_bytes() == (later / name).read_bytes(), name
    meta = json.loads((workdir / "checkpoints" / "1" / "meta" / "metadata").read_text())
    assert meta["model"]["block_size"] == 8 and meta["config"]["model"]["block_size"] == 4


# ------------------------------------------------------------------------- fast lane: a run written by hand


def test_a_run_directory_reads_as_a_model(tmp_path, capsys):
    """Steps saved as the trainers save them read back as models: the step's own model config
    (`meta["model"]`) wins over the run config's (`meta["config"]["model"]`, all older runs have)."""
    config = load_config(config_path("tiny.py"))
    old_style, new_style = init_model(config.model, seed=3), init_model(config.model, seed=4)
    checkpointer = TrainCheckpointer(tmp_path / "run" / "checkpoints", log=lambda _: None)
    checkpointer.save(5, {"policy": nnx.state(old_style)}, {"step": 5, "config": to_dict(config)})
    adapted = dataclasses.replace(config.model, block_size=8)
    checkpointer.save(6, {"policy": nnx.state(new_style)},
                      {"step": 6, "config": to_dict(config), "model": to_dict(adapted)})
    checkpointer.save(7, {"policy": nnx.state(new_style)}, {"step": 7})
    checkpointer.close()

    newest = load_model(tmp_path / "run", log=lambda _: None)  # step 7 names no model: skipped as damaged
    assert newest.policy.config == adapted and newest.source.startswith("step 6 of")
    assert flat(nnx.state(newest.policy)).keys() == flat(nnx.state(new_style)).keys()
    assert all(np.array_equal(a, b) for a, b in zip(flat(nnx.state(newest.policy)).values(),
                                                    flat(nnx.state(new_style)).values()))
    older = load_model(tmp_path / "run" / "checkpoints" / "5")
    assert older.policy.config == config.model and older.value is None and older.tokenizer == "tiny"
    assert all(np.array_equal(a, b) for a, b in zip(flat(nnx.state(older.policy)).values(),
                                                    flat(nnx.state(old_style)).values()))
    with pytest.raises(CheckpointError, match="holds no model config"):
        load_model(tmp_path / "run", step=7)

    assert cli.main(["export-hf", str(tmp_path / "run"), str(tmp_path / "out"), "--step", "5"]) == 0
    exported, exported_config = hf.load_hf_model(tmp_path / "out")
    assert exported_config == config.model and (tmp_path / "out" / "tokenizer.json").is_file()
    assert all(np.array_equal(a, b) for a, b in zip(flat(nnx.state(exported)).values(),
                                                    flat(nnx.state(old_style)).values()))
    capsys.readouterr()
    assert cli.main(["export-hf", str(tmp_path / "run"), str(tmp_path / "out2"), "--step", "9"]) == 2
    assert "no step 9 (steps: [5, 6, 7])" in capsys.readouterr().err


def test_rl_refuses_a_full_export_directory_before_training(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_bytes(b"keep me")
    assert cli.main(["rl", "--config", config_path("rl_tiny.py"), "--workdir", str(tmp_path / "run"),
                     "--export-hf", str(tmp_path / "out")]) == 2
    assert f"--export-hf {tmp_path / 'out'}: directory exists and is not empty" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and (tmp_path / "out" / "model.safetensors").read_bytes() == b"keep me"

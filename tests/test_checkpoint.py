"""TrainCheckpointer: round trips, and damaged checkpoints detected and skipped without losing data."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tradojax.checkpoint import (COMMIT_MARKER, CheckpointError, TrainCheckpointer, find_training_steps,
                                 read_training_step, tree_fingerprints)
from helpers import MICRO_MODEL
from tradojax.models.transformer import Decoder

CONFIG = MICRO_MODEL


@jax.jit
def _build(seed):
    _, params = nnx.split(Decoder(CONFIG, rngs=nnx.Rngs(params=jax.random.key(seed))))
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01) * (seed + 1), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def make_trees(seed: int):
    """Policy params (nnx.State), AdamW state after one update, and a PRNG key: like the RL loop's
    (built in one compiled call: eager initialisation op by op is far slower)."""
    params, opt_state = _build(seed)
    return {"policy": params, "policy_opt": opt_state, "rng": {"key": jax.random.key(seed)}}


def targets():
    return make_trees(99)  # same structure, different values


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def run_dir(tmp_path):
    """A run with steps 10, 20, 30 saved (trees of seeds 1, 2, 3)."""
    directory = tmp_path / "checkpoints"
    checkpointer = TrainCheckpointer(directory, max_to_keep=5, log=lambda _: None)
    for seed, step in ((1, 10), (2, 20), (3, 30)):
        checkpointer.save(step, make_trees(seed), {"step": step, "history": [step / 10]})
    checkpointer.close()
    return directory


def largest_data_file(step_dir):
    files = [os.path.join(root, f) for root, _, names in os.walk(step_dir / "policy") for f in names]
    return max(files, key=os.path.getsize)


def test_round_trip_restores_every_tree_and_meta(run_dir):
    checkpointer = TrainCheckpointer(run_dir, create=False, log=lambda _: None)
    assert checkpointer.all_steps() == [10, 20, 30]
    step, trees, meta = checkpointer.restore_latest_good(targets())
    assert step == 30 and meta == {"step": 30, "history": [3.0]}
    assert_trees_equal(trees, make_trees(3))
    older = checkpointer.restore(10, targets())
    assert_trees_equal(older, make_trees(1))


def test_fingerprint_changes_with_one_flipped_bit_and_with_a_swap():
    x = jax.random.normal(jax.random.key(0), (5, 7), jnp.bfloat16)
    base = tree_fingerprints({"x": x})["['x']"]
    bits = np.asarray(x).view(np.uint16).copy()
    bits[3, 4] ^= 1 << 9
    flipped = jnp.asarray(bits.view(jnp.bfloat16))
    swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
    assert tree_fingerprints({"x": flipped})["['x']"] != base
    assert tree_fingerprints({"x": swapped})["['x']"] != base
    assert tree_fingerprints({"x": jnp.array(x)})["['x']"] == base


def test_host_fingerprints_equal_the_device_program_for_every_dtype():
    """CPU arrays are fingerprinted in numpy, accelerator arrays by the jitted program: a checkpoint
    saved on one must verify on the other."""
    from jax.sharding import NamedSharding, PartitionSpec

    from tradojax.checkpoint import _fingerprints

    rng = np.random.default_rng(3)
    mesh = jax.make_mesh((4,), ("fsdp",), devices=jax.devices()[:4])
    leaves = {"f32": jnp.asarray(rng.normal(size=(33, 7)), jnp.float32),
              "bf16": jnp.asarray(rng.normal(size=(5, 9)), jnp.bfloat16),
              "int32": jnp.asarray(rng.integers(-2**31, 2**31 - 1, size=(1000,)), jnp.int32),
              "uint8": jnp.asarray(rng.integers(0, 256, size=(3, 4, 5)), jnp.uint8),
              "bool": jnp.asarray(rng.random(17) < 0.5), "scalar": jnp.float32(rng.normal()),
              "key": jax.random.key(7),
              "sharded": jax.device_put(jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
                                        NamedSharding(mesh, PartitionSpec("fsdp")))}
    host = tree_fingerprints(leaves)
    device = {f"['{name}']": int(value) for name, value in zip(leaves, _fingerprints(list(leaves.values())))}
    assert host == device
    assert len(set(host.values())) == len(leaves)


@pytest.mark.parametrize("damage", ["truncated_file", "deleted_file", "no_commit_marker", "missing_item",
                                    "flipped_bits", "bad_meta"])
def test_damaged_latest_step_falls_back_to_the_last_good_one(run_dir, damage):
    latest = run_dir / "30"
    if damage == "truncated_file":
        path = largest_data_file(latest)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)
    elif damage == "deleted_file":
        os.remove(largest_data_file(latest))
    elif damage == "no_commit_marker":
        os.remove(latest / COMMIT_MARKER)
    elif damage == "missing_item":
        shutil.rmtree(latest / "policy_opt")
    elif damage == "flipped_bits":  # a value in the (uncompressed) array data changes silently
        path = largest_data_file(latest)
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0x10
        open(path, "wb").write(bytes(data))
    elif damage == "bad_meta":
        (latest / "meta" / "metadata").write_text("{not json")
    messages: list[str] = []
    checkpointer = TrainCheckpointer(run_dir, create=False, log=messages.append)
    step, trees, meta = checkpointer.restore_latest_good(targets())
    assert step == 20 and meta["step"] == 20
    assert_trees_equal(trees, make_trees(2))
    assert any("skipping damaged step 30" in m and str(latest) in m for m in messages), messages
    if damage == "flipped_bits":  # orbax reads it without complaint: the saved fingerprints catch it
        assert any("does not match the fingerprint" in m for m in messages), messages
    # the damaged folder is kept beside the others, out of orbax's way
    moved = [p for p in os.listdir(run_dir) if p.startswith("30.damaged-")]
    assert len(moved) == 1 and any(str(run_dir / moved[0]) in m for m in messages)
    assert checkpointer.all_steps() == [10, 20]
    # training goes on: step 30 can be saved again, and the older steps are untouched
    checkpointer.save(30, make_trees(4), {"step": 30, "history": []})
    again = TrainCheckpointer(run_dir, create=False, log=messages.append)
    step, trees, _ = again.restore_latest_good(targets())
    assert step == 30
    assert_trees_equal(trees, make_trees(4))
    assert_trees_equal(again.restore(10, targets()), make_trees(1))


def test_unfinished_save_is_ignored_and_an_older_damaged_step_is_left_alone(run_dir):
    # a crash mid-save leaves orbax's temporary folder: never listed, never touched
    tmp = run_dir / "40.orbax-checkpoint-tmp-123"
    shutil.copytree(run_dir / "30", tmp)
    os.remove(tmp / COMMIT_MARKER)
    os.remove(largest_data_file(run_dir / "10"))
    checkpointer = TrainCheckpointer(run_dir, create=False, log=lambda _: None)
    step, trees, _ = checkpointer.restore_latest_good(targets())
    assert step == 30
    assert_trees_equal(trees, make_trees(3))
    assert tmp.exists() and (run_dir / "10").exists()  # only damage met on the way is moved


def test_every_step_damaged_raises_naming_each_and_moves_nothing(run_dir):
    for step in (10, 20, 30):
        os.remove(run_dir / str(step) / COMMIT_MARKER)
    checkpointer = TrainCheckpointer(run_dir, create=False, log=lambda _: None)
    with pytest.raises(CheckpointError, match="every checkpoint is damaged") as err:
        checkpointer.restore_latest_good(targets())
    for step in (10, 20, 30):
        assert f"{run_dir / str(step)}: " in str(err.value)
        assert (run_dir / str(step)).is_dir()


def test_missing_or_empty_directory_gives_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory does not exist") as err:
        TrainCheckpointer(tmp_path / "nowhere", create=False)
    assert str(tmp_path / "nowhere") in str(err.value)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        TrainCheckpointer(tmp_path / "a_file")
    empty = TrainCheckpointer(tmp_path / "fresh", log=lambda _: None)
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        empty.restore_latest_good(targets())


def test_saving_an_existing_step_is_refused_and_keeps_the_saved_one(run_dir):
    checkpointer = TrainCheckpointer(run_dir, create=False, log=lambda _: None)
    with pytest.raises(CheckpointError, match="already exists"):
        checkpointer.save(30, make_trees(7), {"step": 30})
    assert_trees_equal(checkpointer.restore(30, targets()), make_trees(3))


# ------------------------------------------------------------------------- readers (export-hf, sample, eval)


def policy_only(meta):
    """Targets chosen from the step's meta, as the model readers do: only the policy is read."""
    assert meta["step"] in (10, 20, 30)
    return {"policy": targets()["policy"]}


def test_reader_takes_a_run_directory_its_checkpoints_or_one_step_folder(run_dir, tmp_path):
    run = run_dir.parent
    assert find_training_steps(run) == (run_dir, None)
    assert find_training_steps(run_dir) == (run_dir, None)
    assert find_training_steps(run_dir / "20") == (run_dir, 20)
    (tmp_path / "other").mkdir()
    assert find_training_steps(tmp_path / "other") is None and find_training_steps(tmp_path / "nope") is None
    for path, step, seed in ((run, None, 3), (run_dir, 10, 1), (run_dir / "20", None, 2), (run_dir / "20", 20, 2)):
        folder, trees, meta = read_training_step(path, policy_only, step=step, log=lambda _: None)
        assert folder == run_dir / str(meta["step"]) and meta["step"] == 10 * seed
        assert set(trees) == {"policy"}
        assert_trees_equal(trees["policy"], make_trees(seed)["policy"])
    with pytest.raises(CheckpointError, match="is the folder of step 20, but step 10 was asked for"):
        read_training_step(run_dir / "20", policy_only, step=10)
    with pytest.raises(CheckpointError, match=r"no step 40 \(steps: \[10, 20, 30\]\)"):
        read_training_step(run, policy_only, step=40)
    with pytest.raises(CheckpointError, match="not a training run"):
        read_training_step(tmp_path / "other", policy_only)


def test_reader_skips_a_damaged_step_and_moves_nothing(run_dir):
    latest = run_dir / "30"
    path = largest_data_file(latest)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))
    messages: list[str] = []
    folder, trees, meta = read_training_step(run_dir.parent, policy_only, log=messages.append)
    assert folder == run_dir / "20" and meta["step"] == 20
    assert_trees_equal(trees["policy"], make_trees(2)["policy"])
    assert any("skipping damaged step 30" in m and "does not match the fingerprint" in m for m in messages), messages
    assert sorted(os.listdir(run_dir)) == ["10", "20", "30"]  # a reader never moves a run's files
    # the damaged step asked for by name is an error, not a silent fallback
    with pytest.raises(CheckpointError, match="does not match the fingerprint") as err:
        read_training_step(latest, policy_only, log=messages.append)
    assert str(latest) in str(err.value)

"""grain pipelines (resume, sharding, epochs), padding, and RL task sampling."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from tradojax.data.pipeline import (
    DataIterator,
    TaskSampler,
    make_iterator,
    pad_sequences,
    resolve_shard,
)

N_RECORDS = 53


def _records(n: int = N_RECORDS) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"id": np.int64(i), "x": rng.normal(size=3).astype(np.float32)} for i in range(n)]


def _take(iterator: DataIterator, k: int) -> list[dict]:
    return [next(iterator) for _ in range(k)]


def _ids(batches: list[dict]) -> list[list[int]]:
    return [b["id"].tolist() for b in batches]


def test_iterator_resumes_exactly_across_epochs():
    kwargs = dict(batch_size=4, seed=3, num_epochs=None, shard_index=0, shard_count=1)
    iterator = make_iterator(_records(), **kwargs)
    _take(iterator, 5)
    state = iterator.get_state()
    state = json.loads(json.dumps(state))  # JSON-friendly, as checkpoints store it
    continued = _take(iterator, 20)  # 25 batches = 100 records: crosses the 53-record epoch boundary
    restored = make_iterator(_records(), **kwargs)
    restored.set_state(state)
    again = _take(restored, 20)
    assert _ids(continued) == _ids(again)
    for a, b in zip(continued, again):
        np.testing.assert_array_equal(a["x"], b["x"])
    assert again[0]["x"].shape == (4, 3) and again[0]["x"].dtype == np.float32


def test_shuffle_is_seeded_and_each_epoch_is_a_fresh_permutation():
    def epochs(seed: int) -> list[list[int]]:
        it = make_iterator(_records(), batch_size=1, seed=seed, num_epochs=2, shard_index=0, shard_count=1)
        flat = [int(b["id"][0]) for b in it]
        return [flat[:N_RECORDS], flat[N_RECORDS:]]

    first, second = epochs(7)
    assert sorted(first) == sorted(second) == list(range(N_RECORDS))
    assert first != second and first != list(range(N_RECORDS))
    assert epochs(7) == [first, second]
    assert epochs(8)[0] != first
    unshuffled = make_iterator(_records(), batch_size=5, seed=0, shuffle=False, shard_index=0, shard_count=1)
    assert _ids(list(unshuffled))[0] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("num_epochs", [1, 3])
def test_shards_are_disjoint_cover_the_stream_and_have_equal_batches(num_epochs):
    shard_count, batch_size = 4, 3
    per_shard = []
    for shard_index in range(shard_count):
        it = make_iterator(
            _records(), batch_size=batch_size, seed=11, num_epochs=num_epochs, drop_remainder=False,
            shard_index=shard_index, shard_count=shard_count,
        )
        per_shard.append([i for batch in it for i in batch["id"].tolist()])
    total = N_RECORDS * num_epochs // shard_count * shard_count
    assert all(len(ids) == total // shard_count for ids in per_shard)
    counts = Counter(i for ids in per_shard for i in ids)
    # Each epoch sees each record once across all hosts (the cut tail excepted), never twice.
    assert sum(counts.values()) == total and max(counts.values()) <= num_epochs
    if num_epochs == 1:
        assert all(set(a).isdisjoint(b) for k, a in enumerate(per_shard) for b in per_shard[k + 1 :])


def test_transform_and_list_collate_for_records():
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    it = make_iterator(
        words, batch_size=2, seed=0, shuffle=False, shard_index=0, shard_count=1, transform=lambda w: (w, len(w))
    )
    assert next(it) == [("alpha", 5), ("beta", 4)]


def test_set_state_rejects_other_pipelines():
    a = make_iterator(_records(), batch_size=4, seed=1, shard_index=0, shard_count=2)
    next(a)
    state = a.get_state()
    b = make_iterator(_records(), batch_size=4, seed=2, shard_index=0, shard_count=2)
    with pytest.raises(ValueError, match="seed: saved 1 vs now 2"):
        b.set_state(state)
    c = make_iterator(_records(), batch_size=4, seed=1, shard_index=1, shard_count=2)
    with pytest.raises(ValueError, match="shard_index"):
        c.set_state(state)
    with pytest.raises(ValueError, match="get_state"):
        a.set_state({"next_index": 3})


def test_resolve_shard_defaults_to_jax_process_and_validates():
    assert resolve_shard() == (0, 1)
    assert resolve_shard(2, 4) == (2, 4)
    with pytest.raises(ValueError, match="shard_index"):
        resolve_shard(4, 4)
    with pytest.raises(ValueError, match="both"):
        resolve_shard(0, None)
    with pytest.raises(ValueError, match="batch_size"):
        make_iterator(_records(), batch_size=0, seed=0, shard_index=0, shard_count=1)


def test_pad_sequences_left_right_and_buckets():
    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_id=0, side="left")
    np.testing.assert_array_equal(ids, [[5, 6, 7], [0, 0, 8]])
    np.testing.assert_array_equal(mask, [[True, True, True], [False, False, True]])
    ids, mask = pad_sequences([[5, 6, 7], [8], []], pad_id=9, side="right", buckets=[2, 4, 8])
    assert ids.shape == (3, 4) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [[5, 6, 7, 9], [8, 9, 9, 9], [9, 9, 9, 9]])
    assert mask.sum() == 4
    with pytest.raises(ValueError, match="largest bucket 2"):
        pad_sequences([[1, 2, 3]], pad_id=0, buckets=[1, 2])


# ----------------------------------------------------------------------------- RL task sampling

TASKS = [f"task-{i}" for i in range(40)]


def test_task_sampler_is_deterministic_replicated_and_resumable():
    sampler = TaskSampler(TASKS, num_task_per_step=8, num_response_per_task=3, seed=5, shard_index=0, shard_count=1)
    steps = [next(sampler) for _ in range(4)]
    step = steps[0]
    assert len(set(step.task_indices)) == 8 and step.tasks == tuple(TASKS[i] for i in step.task_indices)
    assert step.rollout_tasks[:3] == [step.tasks[0]] * 3 and len(step.rollout_tasks) == 24
    np.testing.assert_array_equal(step.group_ids, np.repeat(np.arange(8), 3))
    np.testing.assert_array_equal(step.rollout_task_indices, np.repeat(step.task_indices, 3))
    assert len({s.task_indices for s in steps}) == 4  # steps differ

    state = json.loads(json.dumps(sampler.get_state()))
    after = [next(sampler).task_indices for _ in range(3)]
    resumed = TaskSampler(TASKS, num_task_per_step=8, num_response_per_task=3, seed=5, shard_index=0, shard_count=1)
    resumed.set_state(state)
    assert [next(resumed).task_indices for _ in range(3)] == after
    other_seed = TaskSampler(TASKS, num_task_per_step=8, num_response_per_task=3, seed=6, shard_index=0, shard_count=1)
    assert other_seed.step_tasks(0).task_indices != step.task_indices
    with pytest.raises(ValueError, match="seed"):
        other_seed.set_state(state)


@pytest.mark.parametrize("mode", ["independent", "epoch"])
def test_task_sampler_shards_split_the_global_selection(mode):
    single = TaskSampler(TASKS, num_task_per_step=12, num_response_per_task=2, seed=1, mode=mode, shard_index=0, shard_count=1)
    hosts = [
        TaskSampler(TASKS, num_task_per_step=12, num_response_per_task=2, seed=1, mode=mode, shard_index=h, shard_count=4)
        for h in range(4)
    ]
    for step in range(5):
        local = [h.step_tasks(step).task_indices for h in hosts]
        assert all(len(ids) == 3 for ids in local)
        merged = [i for ids in local for i in ids]
        assert len(set(merged)) == 12 and sorted(merged) == sorted(single.step_tasks(step).task_indices)


def test_epoch_mode_sees_each_task_once_per_epoch():
    sampler = TaskSampler(TASKS, num_task_per_step=8, num_response_per_task=1, seed=2, mode="epoch", shard_index=0, shard_count=1)
    epoch0 = [i for s in range(5) for i in sampler.step_tasks(s).task_indices]
    epoch1 = [i for s in range(5, 10) for i in sampler.step_tasks(s).task_indices]
    assert sorted(epoch0) == sorted(epoch1) == list(range(40))
    assert epoch0 != epoch1


def test_task_sampler_validates():
    with pytest.raises(ValueError, match="exceeds the 40 available"):
        TaskSampler(TASKS, num_task_per_step=41, num_response_per_task=2, seed=0, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="divisible by the number of hosts"):
        TaskSampler(TASKS, num_task_per_step=10, num_response_per_task=2, seed=0, shard_index=0, shard_count=4)
    with pytest.raises(ValueError, match="num_response_per_task"):
        TaskSampler(TASKS, num_task_per_step=8, num_response_per_task=0, seed=0, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="mode"):
        TaskSampler(TASKS, num_task_per_step=8, num_response_per_task=1, seed=0, mode="bogus", shard_index=0, shard_count=1)  # type: ignore[arg-type]

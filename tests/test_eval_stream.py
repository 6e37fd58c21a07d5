"""`evaluate` streams: an eval stopped midway keeps every chunk it finished, and a rerun on the same
stream samples only the rest and ends with the results of an uninterrupted run; on a data-sharded
mesh the results are those of one device."""

import dataclasses
import json

import pytest

import jax

from helpers import config_path
from tradojax.config import ConfigError, MeshConfig, load_config
from tradojax.data.tasks import load_tasks
from tradojax.evaluation import evaluate
from tradojax.models.transformer import init_model
from tradojax.parallel.mesh import make_mesh

# 5 tasks in chunks of 2 (the last chunk holds 1), 2 samples each, one sweep point
OVERRIDES = ["data.synthetic_eval_size=5", "data.synthetic_train_size=10", "eval.num_samples=2", "eval.chunk_tasks=2",
             "eval.strategies=['low_confidence_dynamic']", "eval.top_k=[0]", "sampling.max_new_tokens=12"]


class Stop(Exception):
    """What the test hook raises to stop the eval, as a kill would."""


@pytest.fixture(scope="module")
def setup(tokenizer):
    config = load_config(config_path("tiny.py"), OVERRIDES)
    return config, init_model(config.model, seed=3), tokenizer, load_tasks(config.data, "eval")


def stream_lines(path):
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # the line the test cut short
            assert line.startswith('{"item": {"strategy": "low_conf') and not line.endswith("}")
    return lines


def items_by_key(path):
    return {(r["item"]["task"], r["item"]["sample"]): r["item"] for r in stream_lines(path) if "item" in r}


def run(setup, stream=None, on_chunk=None, seed=5, mesh=None):
    config, model, tokenizer, tasks = setup
    return evaluate(model, tokenizer, tasks, config, seed=seed, stream=stream, on_chunk=on_chunk, mesh=mesh,
                    keep_responses=True)


def without_time(result):
    return dataclasses.replace(result, seconds=0.0)


@pytest.mark.slow
def test_a_stopped_eval_keeps_finished_chunks_and_resumes_to_the_uninterrupted_results(setup, tmp_path):
    whole = tmp_path / "whole.jsonl"
    ran = []
    [reference] = run(setup, whole, on_chunk=lambda c: ran.append(c["chunk"]))
    assert ran == [0, 1, 2]
    reference_items = items_by_key(whole)
    assert len(reference_items) == 5 * 2 and len(reference.responses) == 10

    # stop after the second chunk: the first two chunks (tasks 0-3) are on disk
    stopped = tmp_path / "stopped.jsonl"

    def stop_after_two(chunk):
        if chunk["chunk"] == 1:
            raise Stop

    with pytest.raises(Stop):
        run(setup, stopped, on_chunk=stop_after_two)
    kept = items_by_key(stopped)
    assert sorted(kept) == [(t, s) for t in range(4) for s in range(2)]
    assert all(kept[key] == reference_items[key] for key in kept)
    with open(stopped, "a") as f:  # a kill in the middle of writing the next line
        f.write('{"item": {"strategy": "low_conf')

    ran = []
    [resumed] = run(setup, stopped, on_chunk=lambda c: ran.append(c["chunk"]))
    assert ran == [2]  # only the missing chunk is sampled
    assert items_by_key(stopped) == reference_items
    assert without_time(resumed) == without_time(reference)

    # a finished stream: nothing left to sample, same results
    ran = []
    [again] = run(setup, stopped, on_chunk=lambda c: ran.append(c["chunk"]))
    assert ran == [] and without_time(again) == without_time(reference)


def test_a_stream_of_a_different_eval_is_refused(setup, tmp_path):
    stream = tmp_path / "s.jsonl"
    with pytest.raises(Stop):
        run(setup, stream, on_chunk=lambda c: (_ for _ in ()).throw(Stop()))
    with pytest.raises(ConfigError, match=r"s\.jsonl: written by a different eval \(seed: 5 there, 6 now\)"):
        run(setup, stream, seed=6)


def test_eval_on_a_data_sharded_mesh_equals_one_device(setup):
    mesh = make_mesh(MeshConfig(data=4, fsdp=1, tensor=1), jax.devices()[:4])
    [one] = run(setup)
    [sharded] = run(setup, mesh=mesh)
    assert without_time(sharded) == without_time(one)
    assert 0.0 < one.mean_length <= 12

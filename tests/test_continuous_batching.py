"""The rollout engine's compiled programs as `BlockDiffusionSampler.programs` reports them (what
`tradojax aot` compiles) are the ones `generate` runs."""

import dataclasses

import jax
import numpy as np
import pytest

from helpers import TINY_MODEL
from tradojax.config import MeshConfig, SamplingConfig
from tradojax.models.transformer import abstract_model, init_model
from tradojax.parallel.mesh import make_mesh
from tradojax.sampling import block_diffusion as bd
from tradojax.sampling.block_diffusion import BlockDiffusionSampler

MODEL_CONFIG = TINY_MODEL  # vocab 512, mask 3, eos 0, pad 0
MODEL = init_model(MODEL_CONFIG, seed=0)
RNG = np.random.RandomState(1)
PROMPTS = [RNG.randint(4, MODEL_CONFIG.vocab_size, size=n).tolist() for n in (3, 9, 14, 8, 5)]
SAMPLING = SamplingConfig(block_size=4, denoising_steps=4, temperature=0.05, top_p=0.9, max_new_tokens=13,
                          num_samples=2, prompt_buckets=(16,))


def record_calls(monkeypatch) -> dict[str, list]:
    """Wraps the engine's jitted functions so a test sees the arguments `generate` passes."""
    calls: dict[str, list] = {}
    for name in [n for n in vars(bd) if n.endswith("_jit")]:
        fn = getattr(bd, name)

        class Recorder:
            def __init__(self, fn, key):
                self.fn, self.key = fn, key

            def __call__(self, *args, **kwargs):
                calls.setdefault(self.key, []).append((args, kwargs))
                return self.fn(*args, **kwargs)

            def __getattr__(self, attr):
                return getattr(self.fn, attr)

        monkeypatch.setattr(bd, name, Recorder(fn, name[1:-4]))
    return calls


@pytest.mark.parametrize("sharded", [False, True])
def test_programs_are_the_ones_generate_runs(monkeypatch, sharded):
    """Every program `generate` calls is in `programs(rows, prompt_len)`, and lowering it from the
    abstract arguments gives the same program text as lowering it from the arguments `generate`
    passed; the same holds for a sampler built on an abstract model (no weights)."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)) if sharded else None
    sampler = BlockDiffusionSampler(MODEL, SAMPLING, mesh=mesh)
    calls = record_calls(monkeypatch)
    rows = len(PROMPTS) * SAMPLING.num_samples
    sampler.generate(PROMPTS, rng=3)
    abstract_sampler = BlockDiffusionSampler(abstract_model(MODEL_CONFIG), SAMPLING, mesh=mesh)
    for programs in (sampler.programs(rows, 14), abstract_sampler.programs(rows, 14)):
        assert set(calls) <= set(programs), (set(calls), set(programs))
        for name, (fn, args, kwargs) in programs.items():
            lowered = fn.lower(*args, **kwargs)
            if name in calls:
                call_args, call_kwargs = calls[name][0]
                assert lowered.as_text() == getattr(bd, f"_{name}_jit").fn.lower(*call_args, **call_kwargs).as_text(), name
        compiled = {name: fn.lower(*args, **kwargs).compile() for name, (fn, args, kwargs) in programs.items()}
        assert all(c.memory_analysis() is not None for c in compiled.values())
        if sharded:  # the KV cache: slots over the data axes, kv_heads over tensor
            state = programs["decode"][1][2]
            assert tuple(state.k.sharding.spec) == (None, ("data", "fsdp"), None, "tensor", None), state.k.sharding.spec


# ----------------------------------------------------------------------------------------------
# Continuous batching: the same answers at any max_active, memory bounded by it
# ----------------------------------------------------------------------------------------------


def assert_same_rollout(rollout, expected):
    """Tokens, lengths, traces, stops and steps identical; log-probs equal up to float32 rounding
    (XLA reduces the softmax normaliser in an order that depends on the compiled batch shape, as
    the one-batch engine already does between batch sizes)."""
    for field in ("tokens", "lengths", "trace", "hit_stop", "num_steps", "prompt_index", "prompt_lengths"):
        np.testing.assert_array_equal(getattr(rollout, field), getattr(expected, field), err_msg=field)
    np.testing.assert_allclose(rollout.logprobs, expected.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("strategy", ["low_confidence_static", "low_confidence_dynamic", "sequential", "entropy_bounded"])
def test_any_max_active_gives_the_one_batch_answers(strategy):
    """5 ragged prompts x 2 samples = 10 rows: one slot at a time, 3 slots (groups split across
    refills, refills mid-flight), and more slots than rows (one batch)."""
    sampling = dataclasses.replace(SAMPLING, remasking_strategy=strategy, dynamic_threshold=0.3, stop_token_ids=(336,))
    one_batch = BlockDiffusionSampler(MODEL, dataclasses.replace(sampling, max_active=64)).generate(PROMPTS, rng=4)
    one_batch = one_batch.to_numpy()
    assert one_batch.prefill_forwards == 1  # every prompt prefilled once, in one forward
    assert len(set(one_batch.lengths.tolist())) >= 3 and one_batch.hit_stop.any()  # rows end at different times
    for max_active in (1, 3):
        rollout = BlockDiffusionSampler(MODEL, dataclasses.replace(sampling, max_active=max_active)).generate(
            PROMPTS, rng=4).to_numpy()
        assert_same_rollout(rollout, one_batch)
        # rows run a slot at a time: more forwards, each over max_active sequences
        assert rollout.num_forwards > one_batch.num_forwards
        if max_active == 1:  # one row at a time: the forwards are its steps, nothing else
            assert rollout.num_forwards == rollout.num_steps.sum()


def test_compute_bound_batches_let_saves_wait(monkeypatch):
    """Past `_FUSE_ALWAYS_TOKENS` tokens per forward the fused save runs only once half the resident
    sequences have a block to save; the others wait (no step) and the answers do not change."""
    sampling = dataclasses.replace(SAMPLING, remasking_strategy="low_confidence_dynamic", dynamic_threshold=0.3,
                                   max_active=64)
    always = BlockDiffusionSampler(MODEL, sampling).generate(PROMPTS, rng=6).to_numpy()
    monkeypatch.setattr(bd, "_FUSE_ALWAYS_TOKENS", 0)
    sampler = BlockDiffusionSampler(MODEL, sampling)
    assert not sampler._plan(16, 5).fuse_always
    waiting = sampler.generate(PROMPTS, rng=6).to_numpy()
    assert_same_rollout(waiting, always)
    # fewer fused forwards (here the longest row still bounds the total)
    assert waiting.save_forwards < always.save_forwards and waiting.num_forwards >= always.num_forwards


def test_continuous_batching_sharded_over_replicas():
    """Over 4 data-parallel replicas (8 devices: data 2 x fsdp 2, tensor 2) with 2 slots each, the
    rows (5 prompts padded to 8, so one replica holds only padding) match the unsharded one batch."""
    sampling = dataclasses.replace(SAMPLING, remasking_strategy="low_confidence_static")
    expected = BlockDiffusionSampler(MODEL, dataclasses.replace(sampling, max_active=64)).generate(
        PROMPTS, rng=5).to_numpy()
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sampler = BlockDiffusionSampler(MODEL, dataclasses.replace(sampling, max_active=1), mesh=mesh)
    rollout = sampler.generate(PROMPTS, rng=5).to_numpy()
    assert_same_rollout(rollout, expected)


def test_memory_is_bounded_by_max_active():
    """The compiled decode holds max_active sequences' KV cache per replica whatever the rows; only
    the rollout arrays (tokens, trace, log-probs: 12 bytes per token) grow with the rows."""
    sampling = dataclasses.replace(SAMPLING, max_active=3)
    sampler = BlockDiffusionSampler(MODEL, sampling)
    sizes = {}
    for rows in (10, 400):
        programs = sampler.programs(rows, 14)
        state = programs["decode"][1][2]
        assert state.k.shape == (MODEL_CONFIG.num_layers, 3, bd.cache_slots(16, 4, 13), MODEL_CONFIG.num_kv_heads,
                                 MODEL_CONFIG.head_dim)
        assert state.rows_tokens.shape == (rows, 13 + 4)
        fn, args, kwargs = programs["decode"]
        memory = fn.lower(*args, **kwargs).compile().memory_analysis()
        sizes[rows] = memory.argument_size_in_bytes + memory.temp_size_in_bytes
    rollout_bytes = (400 - 10) * (13 + 4) * 12 + (400 - 10) * 4 * 3
    assert sizes[400] - sizes[10] <= 1.1 * rollout_bytes, sizes
    # the one-batch engine's would grow by the K/V of 390 more rows (16 KiB each here): 40x more
    cache_per_row = 2 * state.k.size // 3 * 4
    assert sizes[400] - sizes[10] < (400 - 10) * cache_per_row / 40, sizes

"""The rollout engine's compiled programs as `BlockDiffusionSampler.programs` reports them (what
`tradojax aot` compiles) are the ones `generate` runs."""

import dataclasses

import jax
import numpy as np
import pytest

from tradojax.config import MeshConfig, ModelConfig, SamplingConfig
from tradojax.models.transformer import abstract_model, init_model
from tradojax.parallel.mesh import make_mesh
from tradojax.sampling import block_diffusion as bd
from tradojax.sampling.block_diffusion import BlockDiffusionSampler

MODEL_CONFIG = ModelConfig()  # tiny: vocab 512, mask 3, eos 0, pad 0
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

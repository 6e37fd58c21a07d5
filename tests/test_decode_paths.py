"""The rollout's fast decode paths change no token: per-layer weights (the sampler's default on CPU:
no weight copy per forward; bit-identical) and the live-slot reference attention give the tokens,
traces and log-probs of the stacked scan over the dense full-cache attention, for greedy and
sampled strategies.

The live-slot attention sums in another order (logits agree to ~2e-7), so a sampling decision whose
threshold (top-p boundary, entropy bound, dynamic threshold) falls within float32 rounding could
flip; none of these fixtures has one."""

import numpy as np
import pytest
import jax

from tradojax.config import ModelConfig, SamplingConfig
from tradojax.models.transformer import init_model
from tradojax.ops import attention as attention_ops
from tradojax.sampling.block_diffusion import CPU_SMALL_DECODE_OPTIONS, BlockDiffusionSampler, decode_xla_options

CONFIG = ModelConfig(num_layers=3, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=300,
                     attention_impl="reference")
PROMPT_LENGTHS = (5, 9, 12, 3)  # ragged: different live cache lengths in one batch

STRATEGIES = {
    "greedy_static": dict(top_k=1, remasking_strategy="low_confidence_static"),
    "greedy_dynamic": dict(top_k=1, remasking_strategy="low_confidence_dynamic", dynamic_threshold=0.05),
    "sampled_static": dict(top_k=0, temperature=1.0, remasking_strategy="low_confidence_static"),
    "sampled_entropy_bounded": dict(temperature=0.8, remasking_strategy="entropy_bounded"),
    "sampled_top_p_dynamic": dict(top_p=0.9, temperature=0.8, remasking_strategy="low_confidence_dynamic",
                                  dynamic_threshold=0.3),
}


def rollout(sampler):
    rng = np.random.RandomState(0)
    prompts = [rng.randint(4, CONFIG.vocab_size, size=n).tolist() for n in PROMPT_LENGTHS]
    r = sampler.generate(prompts, rng=7).to_numpy()
    return {name: np.asarray(getattr(r, name)) for name in ("tokens", "trace", "logprobs", "lengths")}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_fast_paths_give_the_same_rollout(strategy, monkeypatch):
    model = init_model(CONFIG, seed=3)
    sampling = SamplingConfig(block_size=4, denoising_steps=4, max_new_tokens=24, num_samples=2,
                              **STRATEGIES[strategy])
    default = BlockDiffusionSampler(model, sampling)
    assert default.per_layer == (jax.default_backend() == "cpu")
    if default.per_layer:  # the placed weights: one array per layer, the model's own stay stacked
        assert len(default.params["layers"]["q_proj"].get_value()) == CONFIG.num_layers
        assert model.layers.q_proj[...].shape[0] == CONFIG.num_layers
    fast = rollout(default)
    monkeypatch.setattr(attention_ops, "live_cache_attention", attention_ops.full_cache_attention)
    dense = rollout(BlockDiffusionSampler(model, sampling, per_layer=False))
    assert fast["lengths"].sum() > 0
    for name in ("tokens", "trace", "lengths"):
        np.testing.assert_array_equal(fast[name], dense[name], err_msg=name)
    apart = np.abs(fast["logprobs"] - dense["logprobs"])
    if "top_p" in STRATEGIES[strategy]:
        # a token whose cumulative probability sits on the nucleus edge within rounding can enter or
        # leave it on one path only, renormalising that position's kept mass (seen: 3e-3 at 1 of 192)
        assert (apart > 2e-6).mean() <= 0.02 and apart.max() < 1e-2, apart.max()
    else:
        assert apart.max() <= 2e-6, apart.max()  # attention sums reordered


def test_small_cpu_decodes_compile_with_the_package_xla_options():
    """On CPU, a decode whose largest forward (the fused save's 2b tokens per resident sequence) has
    at most 32 tokens compiles with XLA:CPU's YNNPACK fusions off (its few-row matmul kernels are
    slow: benchmarks/rollout.py); larger ones, and the other platforms, keep XLA's defaults."""
    assert decode_xla_options(None, 32) == (CPU_SMALL_DECODE_OPTIONS if jax.default_backend() == "cpu" else ())
    assert decode_xla_options(None, 64) == ()
    model = init_model(CONFIG, seed=3)
    sampler = BlockDiffusionSampler(model, SamplingConfig(block_size=4, denoising_steps=4, max_new_tokens=8))
    small, large = sampler.decode_options(4, 12), sampler.decode_options(5, 12)  # 4 x 2b = 32, 5 x 2b = 40 tokens
    assert small == (dict(CPU_SMALL_DECODE_OPTIONS) if jax.default_backend() == "cpu" else {})
    assert large == {}
    pinned = BlockDiffusionSampler(model, SamplingConfig(block_size=4, denoising_steps=4, max_new_tokens=8),
                                   xla_options=())
    assert pinned.decode_options(1, 12) == {}


@pytest.mark.parametrize("strategy", ["greedy_dynamic", "sampled_static"])
def test_the_small_decode_xla_options_change_no_token(strategy):
    """YNNPACK fusions off (the package's choice for small CPU decodes) only changes matmul rounding:
    the same tokens and traces as XLA's defaults, log-probs within float32 rounding."""
    model = init_model(CONFIG, seed=3)
    sampling = SamplingConfig(block_size=4, denoising_steps=4, max_new_tokens=24, num_samples=2,
                              **STRATEGIES[strategy])
    tuned = rollout(BlockDiffusionSampler(model, sampling, xla_options=CPU_SMALL_DECODE_OPTIONS))
    plain = rollout(BlockDiffusionSampler(model, sampling, xla_options=()))
    assert tuned["lengths"].sum() > 0
    for name in ("tokens", "trace", "lengths"):
        np.testing.assert_array_equal(tuned[name], plain[name], err_msg=name)
    assert np.abs(tuned["logprobs"] - plain["logprobs"]).max() <= 2e-6

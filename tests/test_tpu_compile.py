"""The Pallas kernels through the real compilers, without the hardware.

TPU: with `libtpu` installed, `jax.experimental.topologies` gives the devices of a TPU slice on this
CPU host, and `jit(...).lower(...).compile()` runs XLA:TPU and Mosaic on the kernels. A tiny model
(head_dim 128, bfloat16, attention_impl="pallas") compiles a training step (forward + gradient:
the flash forward, dq and dk/dv kernels) and a rollout step (prefill: the flash forward; one
decode block and one fused save: the decode kernel) for v5e:2x2 and v5p:2x2x1 on a (data=2, tensor=2) mesh, so the
kernels also run under shard_map.

GPU: no CUDA device here, so the Triton kernels are lowered for the "cuda" platform (jax lowers
Pallas Triton kernels to Triton IR on any host; the PTX compile happens in XLA:GPU on a GPU).
"""

from __future__ import annotations

import os
import re

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test processes may hold libtpu

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from tradojax.config import MeshConfig, ModelConfig  # noqa: E402
from tradojax.models import transformer  # noqa: E402
from tradojax.ops.masks import MaskRule, Segments  # noqa: E402
from tradojax.aot import tpu_devices  # noqa: E402
from tradojax.parallel.mesh import make_mesh  # noqa: E402
from tradojax.parallel.sharding import param_sharding  # noqa: E402

CONFIG = ModelConfig(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8, num_kv_heads=2,
                     head_dim=128, compute_dtype="bfloat16", attention_impl="pallas")
BATCH, LENGTH, SLOTS, BLOCK = 4, 384, 512, 4


def train_step(graphdef):
    def step(params, tokens, positions, segments):
        def loss(params):
            logits = nnx.merge(graphdef, params)(tokens, positions, segments, MaskRule.BLOCK_DIFFUSION)
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

        return jax.grad(loss)(params)

    return step


def rollout_step(graphdef):
    def step(params, prompt, lengths, cache, block_tokens):
        model = nnx.merge(graphdef, params)
        cache = model.prefill(prompt, lengths, cache, BLOCK)
        logits, cache = model.decode_block(block_tokens, cache, commit=True)
        # the fused save (the sampler's decode iteration): b queries against 2b block keys
        save = jnp.arange(block_tokens.shape[0]) % 2 == 0
        fused, cache = model.decode_block_after_save(block_tokens, save, block_tokens, cache)
        return logits, fused, cache

    return step


def abstract_inputs(mesh, param_role: str):
    graphdef, params = nnx.split(transformer.abstract_model(CONFIG))
    params = nnx.map_state(lambda path, leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=param_sharding(
        ".".join(str(p) for p in path), leaf.shape, mesh, param_role)), params)

    def batch(shape, dtype, *rest):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P("data", *rest)))

    return graphdef, params, batch


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
def test_model_steps_compile_with_mosaic_kernels(topology):
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), tpu_devices(topology))
    graphdef, params, batch = abstract_inputs(mesh, "train")
    segments = Segments(batch((BATCH, LENGTH), jnp.int32, None), batch((BATCH, LENGTH), jnp.int32, None),
                        batch((BATCH, LENGTH), jnp.bool_, None))
    train = jax.jit(train_step(graphdef)).lower(
        params, batch((BATCH, LENGTH), jnp.int32, None), batch((BATCH, LENGTH), jnp.int32, None), segments).compile()
    text = train.as_text()
    assert "tpu_custom_call" in text
    assert {"segment_flash_fwd", "segment_flash_dq", "segment_flash_dkv"} <= set(re.findall(r"segment_flash_\w+", text))
    assert train.memory_analysis().temp_size_in_bytes > 0

    graphdef, params, batch = abstract_inputs(mesh, "rollout")
    cache_shape = (CONFIG.num_layers, BATCH, SLOTS, CONFIG.num_kv_heads, CONFIG.head_dim)
    cache_sharding = NamedSharding(mesh, P(None, "data", None, "tensor", None))
    cache = transformer.KVCache(jax.ShapeDtypeStruct(cache_shape, jnp.bfloat16, sharding=cache_sharding),
                                jax.ShapeDtypeStruct(cache_shape, jnp.bfloat16, sharding=cache_sharding),
                                batch((BATCH,), jnp.int32))
    rollout = jax.jit(rollout_step(graphdef), donate_argnums=3).lower(
        params, batch((BATCH, LENGTH), jnp.int32, None), batch((BATCH,), jnp.int32), cache,
        batch((BATCH, BLOCK), jnp.int32, None)).compile()
    text = rollout.as_text()
    assert "tpu_custom_call" in text
    assert "segment_flash_fwd" in text and "block_decode_attention" in text


def test_model_steps_lower_to_triton_for_cuda():
    graphdef, params = nnx.split(transformer.abstract_model(CONFIG))
    sds = jax.ShapeDtypeStruct
    segments = Segments(sds((BATCH, LENGTH), jnp.int32), sds((BATCH, LENGTH), jnp.int32),
                        sds((BATCH, LENGTH), jnp.bool_))
    tokens = sds((BATCH, LENGTH), jnp.int32)
    train = jax.jit(train_step(graphdef)).trace(params, tokens, tokens, segments).lower(lowering_platforms=("cuda",))
    # per layer scan body: forward (with lse), dq, dk/dv
    assert train.as_text().count("__gpu$xla.gpu.triton") == 3
    cache_shape = (CONFIG.num_layers, BATCH, SLOTS, CONFIG.num_kv_heads, CONFIG.head_dim)
    cache = transformer.KVCache(sds(cache_shape, jnp.bfloat16), sds(cache_shape, jnp.bfloat16),
                                sds((BATCH,), jnp.int32))
    rollout = jax.jit(rollout_step(graphdef)).trace(
        params, tokens, sds((BATCH,), jnp.int32), cache, sds((BATCH, BLOCK), jnp.int32),
    ).lower(lowering_platforms=("cuda",))
    # prefill forward, decode, and the fused save's two halves
    assert rollout.as_text().count("__gpu$xla.gpu.triton") == 4

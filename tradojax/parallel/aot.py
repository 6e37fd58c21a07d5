"""Ahead-of-time compilation for a TPU topology on any host (`tradojax aot`).

With the `libtpu` package installed, `jax.experimental.topologies` describes the chips of a TPU
slice without the slice being attached; `jax.jit(step).lower(abstract inputs with shardings on a
mesh of those devices).compile()` runs the real TPU compiler (XLA + Mosaic for Pallas kernels),
and the compiled executable reports per-chip memory and FLOPs. This proves that a step lowers and
fits before a TPU is ever booked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tradojax.config import Config, MeshConfig, load_config, split_config_args
from tradojax.models.transformer import abstract_model
from tradojax.ops.masks import MaskRule, inference_segments
from tradojax.parallel.mesh import batch_sharding, data_parallel_size, make_mesh
from tradojax.parallel.sharding import param_sharding, state_shardings

# High-bandwidth memory per chip, GiB (public Cloud TPU specs).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}


def tpu_devices(topology: str) -> list[jax.Device]:
    """The devices of a TPU topology such as `v5p:2x2x1`, `v5e:2x2` or `v6e:4x4` (needs libtpu)."""
    from jax.experimental import topologies

    generation = topology.split(":")[0]
    if generation not in HBM_GIB:
        raise ValueError(f"--topology {topology!r}: unknown TPU generation {generation!r} (known: {sorted(HBM_GIB)})")
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topology, chip_config_name="default",
            chips_per_host_bounds=(2, 2, 1), num_slices=1)
    except Exception as err:  # libtpu missing or a malformed name: say which
        raise ValueError(f"--topology {topology!r}: cannot describe it ({type(err).__name__}: {err}); "
                         "is the `libtpu` package installed (pip install 'tradojax[tpu-compile]')?") from err
    return list(desc.devices)


def forward_flops(model, batch: int, length: int, visible_fraction: float = 0.5) -> float:
    """Model FLOPs of one forward: 2 per weight per token (embedding lookup excluded) plus
    attention scores and values over the visible keys (about half of them, block-causal)."""
    # the embedding lookup is free; a tied head still multiplies by the embedding matrix
    matmul_params = model.num_params() - (0 if model.tie_word_embeddings else model.vocab_size * model.hidden_size)
    tokens = batch * length
    attention = 4 * model.num_layers * model.num_heads * model.head_dim * length * visible_fraction * tokens
    return 2.0 * matmul_params * tokens + attention


@dataclasses.dataclass
class CompiledStep:
    name: str
    flops: float  # per chip, analytic model FLOPs (XLA counts a scanned layer once)
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    code_bytes: int
    lowered_text: str  # StableHLO before compilation (the compiled HLO text is not readable
    # across the jaxlib/libtpu proto boundary)

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes + self.code_bytes


def compile_step(name: str, fn: Callable, args: tuple, in_shardings, out_shardings=None,
                 donate_argnums=(), flops: float = 0.0) -> CompiledStep:
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums)
    lowered = jitted.lower(*args)
    compiled = lowered.compile()
    memory = compiled.memory_analysis()
    return CompiledStep(
        name=name,
        flops=flops,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        lowered_text=lowered.as_text(),
    )


def abstract_params(config: Config, mesh: Mesh, role: str):
    graphdef, params = nnx.split(abstract_model(config.model))
    shardings = state_shardings(params, mesh, role)
    abstract = nnx.map_state(
        lambda path, leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=param_sharding(
            ".".join(str(p) for p in path), leaf.shape, mesh, role)), params)
    return graphdef, abstract, shardings


def forward_step(config: Config, mesh: Mesh, batch: int, length: int) -> CompiledStep:
    """Block-causal forward returning the log-prob of every target token (what training needs)."""
    graphdef, params, param_shardings = abstract_params(config, mesh, "train")
    block_size = config.model.block_size

    def step(params, tokens, targets):
        model = nnx.merge(graphdef, params)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        segments = inference_segments(positions, jnp.ones(tokens.shape, bool), block_size)
        logits = model(tokens, positions, segments, MaskRule.BLOCK_DIFFUSION)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]

    token_sharding = batch_sharding(mesh, 2)
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=token_sharding)
    return compile_step("forward", step, (params, tokens, tokens),
                        in_shardings=(param_shardings, token_sharding, token_sharding),
                        out_shardings=token_sharding,
                        flops=forward_flops(config.model, batch, length) / mesh.size)


STEPS: dict[str, Callable[..., CompiledStep]] = {"forward": forward_step}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main(argv: list[str]) -> int:
    config_path, overrides, rest = split_config_args(argv)
    parser = argparse.ArgumentParser(prog="tradojax aot", description=__doc__.splitlines()[0])
    parser.add_argument("--topology", required=True, help="e.g. v5p:2x2x1, v5e:2x2, v6e:2x2")
    parser.add_argument("--steps", default="forward", help=f"comma-separated, of {sorted(STEPS)}")
    parser.add_argument("--batch", type=int, default=0, help="global batch (default: one row per data-parallel shard)")
    parser.add_argument("--length", type=int, default=2048, help="sequence length")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(rest)
    if config_path is None:
        parser.error("--config=FILE is required")
    config = load_config(config_path, overrides)
    devices = tpu_devices(args.topology)
    mesh_config = config.mesh
    if (mesh_config.data, mesh_config.fsdp, mesh_config.tensor) == (-1, 1, 1):
        mesh_config = MeshConfig(data=1, fsdp=-1, tensor=1)  # default for big models: shard parameters
    mesh = make_mesh(mesh_config, devices)
    batch = args.batch or data_parallel_size(mesh)
    generation = args.topology.split(":")[0]
    hbm = HBM_GIB[generation] * 2**30
    print(f"{config_path}: {config.model.num_params() / 1e9:.2f}B parameters, {config.model.param_dtype} params, "
          f"{config.model.compute_dtype} compute, remat={config.model.remat}")
    print(f"topology {args.topology}: {len(devices)} devices ({devices[0].device_kind}), mesh {dict(mesh.shape)}, "
          f"HBM {HBM_GIB[generation]} GiB per chip; batch {batch} x length {args.length}")
    rows = []
    for name in args.steps.split(","):
        if name not in STEPS:
            parser.error(f"--steps: unknown step {name!r} (known: {sorted(STEPS)})")
        result = STEPS[name](config, mesh, batch, args.length)
        rows.append(result)
    header = f"{'step':<10} {'args GiB':>9} {'temp GiB':>9} {'out GiB':>8} {'peak GiB':>9} {'HBM %':>6} {'TFLOPs/chip':>12}  fits"
    print(header)
    print("-" * len(header))
    report = []
    for r in rows:
        fits = r.peak_bytes <= hbm
        print(f"{r.name:<10} {_gib(r.argument_bytes):>9} {_gib(r.temp_bytes):>9} {_gib(r.output_bytes):>8} "
              f"{_gib(r.peak_bytes):>9} {100 * r.peak_bytes / hbm:>6.1f} {r.flops / 1e12:>12.2f}  {'yes' if fits else 'NO'}")
        report.append({"step": r.name, "topology": args.topology, "devices": len(devices), "mesh": dict(mesh.shape),
                       "batch": batch, "length": args.length, "argument_bytes": r.argument_bytes,
                       "temp_bytes": r.temp_bytes, "output_bytes": r.output_bytes, "code_bytes": r.code_bytes,
                       "peak_bytes": r.peak_bytes, "hbm_bytes": hbm, "fits": fits, "flops_per_chip": r.flops})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

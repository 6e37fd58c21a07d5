"""`tradojax aot`: the programs a config's runs compile, compiled for a TPU slice on this host.

With the `libtpu` package installed, `jax.experimental.topologies` describes the chips of a TPU
slice without the slice being attached; lowering a jitted function on abstract arguments laid out on
a mesh of those devices and compiling it runs the real TPU compiler (XLA + Mosaic for the Pallas
kernels), and the executable reports its per-chip memory. Nothing here restates model or sampler
code: the programs are the very jitted functions the runs call, with the arguments they pass,
from their own modules:

  rollout/*      `programs` of the RL loop's sampler (`rl.num_tasks_per_step x
                 rl.num_responses_per_task` rows, the prompt bucket of `train.max_prompt_len`,
                 `sampling.max_new_tokens`, `sampling.max_active` resident per replica): the
                 block-diffusion engine's, or for LLaDA/Dream the full-attention sampler's
                 `generate` (one wave of `max_active` rows per replica; their RL learner is not
                 built yet, and aot says so for its programs);
  old_logprobs, ref_logprobs, policy_update, old_values, value_update
                 `rl.loop.rl_programs`: the learner's passes on `train.batch_size`-row updates and
                 one-micro-batch forward passes;
  eval/STRATEGY/*  the sampler of each point of the eval sweep (`evaluation.eval_sampling`), on
                 `eval.chunk_tasks x eval.num_samples` rows: what `tradojax eval` runs, and what
                 `tradojax rl` runs every `rl.eval_every` steps.

A config with an `rl` section gets the RL programs and its eval sweep; one without, the eval
sweep (`--command` chooses). A program's per-chip peak is its arguments, outputs not written
into donated arguments, temporaries and code; "resident" adds what the run holds on the chips
while the program runs but does not pass to it (the trainer's parameters and optimizer state
during a rollout, the loaded weights during an eval). A program fits when both together fit the
chip's HBM. Programs that lower to the same text are compiled once.

The slices come from `mesh.slices` in the config (or `--topology`); the mesh is the config's
`mesh` over that slice's chips, as `tradojax rl` builds it on the slice.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tradojax.config import Config, ConfigError, load_config, load_config_dict, split_config_args
from tradojax.evaluation import eval_sampling
from tradojax.models.transformer import abstract_model
from tradojax.models.value import ValueModel
from tradojax.parallel.mesh import make_mesh
from tradojax.parallel.sharding import state_shardings
from tradojax.rl.loop import optimizers, rl_programs, rollout_sampling, row_layout
from tradojax.sampling.block_diffusion import prompt_bucket
from tradojax.sampling.full_diffusion import sampler_for

# High-bandwidth memory per chip, GiB (public Cloud TPU specs).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# Chips per host of a multi-host slice (v4/v5p: 4; v5e/v6e: up to 8 as 2x4, 4 in larger pods).
_HOST_BOUNDS = {"v4": (2, 2, 1), "v5p": (2, 2, 1), "v5e": (2, 2, 1), "v6e": (2, 2, 1)}
COMMANDS = ("rl", "eval")

Program = tuple[Callable, tuple, dict]  # (jitted function, args, kwargs): fn.lower(*args, **kwargs)


def _drop_cpu_only_xla_flags() -> None:
    """libtpu parses XLA_FLAGS itself, at its first compile, and aborts on a flag its own XLA does
    not define (e.g. `--xla_cpu_use_fusion_emitters`, which jaxlib's XLA:CPU knows). XLA:CPU's
    flags mean nothing to a TPU compile: once the CPU backend has read them, they leave the
    environment."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    kept = [flag for flag in flags if not flag.startswith("--xla_cpu_")]
    if len(kept) < len(flags):
        one = jax.device_put(1, jax.devices("cpu")[0])
        jax.jit(lambda x: x + 1)(one).block_until_ready()  # a CPU compile: the CPU backend has read them
        os.environ["XLA_FLAGS"] = " ".join(kept)


def tpu_devices(topology: str) -> list[jax.Device]:
    """The devices of a TPU topology such as `v5p:2x2x1`, `v5e:2x2`, `v6e:4x4` or `v5e:1x1` (needs libtpu)."""
    from jax.experimental import topologies

    # describing a topology opens no chip: let several compile-only processes load libtpu at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    _drop_cpu_only_xla_flags()
    generation, _, shape = topology.partition(":")
    if generation not in HBM_GIB:
        raise ValueError(f"--topology {topology!r}: unknown TPU generation {generation!r} (known: {sorted(HBM_GIB)})")
    if not re.fullmatch(r"\d+(x\d+){1,2}", shape):
        raise ValueError(f"--topology {topology!r}: expected GENERATION:AxB or GENERATION:AxBxC, e.g. v5p:2x2x1")
    dims = [int(d) for d in shape.split("x")] + [1] * (3 - len(shape.split("x")))
    # a slice smaller than one host's chips is one host holding all of them
    bounds = tuple(min(b, d) for b, d in zip(_HOST_BOUNDS[generation], dims))
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topology, chip_config_name="default",
            chips_per_host_bounds=bounds, num_slices=1)
    except Exception as err:  # libtpu missing or a malformed name: say which
        raise ValueError(f"--topology {topology!r}: cannot describe it ({type(err).__name__}: {err}); "
                         "is the `libtpu` package installed (pip install 'tradojax[tpu-compile]')?") from err
    return list(desc.devices)


# ----------------------------------------------------------------------------------------------
# Abstract state, laid out as the runs lay it out
# ----------------------------------------------------------------------------------------------


def abstract_placed(params: nnx.State, mesh: Mesh | None, role: str) -> nnx.State:
    """Parameters as ShapeDtypeStructs in their `role` shardings (what `shard_params` places), in
    the same tree (nnx.Param wrappers included)."""
    leaves, treedef = jax.tree.flatten(params)
    shardings = [None] * len(leaves) if mesh is None else jax.tree.leaves(state_shardings(params, mesh, role))
    return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, shardings)])


def abstract_opt_state(tx: optax.GradientTransformation, params: nnx.State, mesh: Mesh | None) -> Any:
    """`place_state(tx.init(params))`: moments beside their parameters, the rest replicated."""
    state = jax.eval_shape(tx.init, params)
    if mesh is None:
        return state
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = optax.tree_map_params(tx, lambda _, p: p.sharding, state, params,
                                      transform_non_params=lambda _: replicated)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def bytes_per_chip(tree: Any) -> int:
    """The largest per-device share of `tree`'s abstract arrays."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.shape if getattr(leaf, "sharding", None) is None else leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


# ----------------------------------------------------------------------------------------------
# The programs of a run
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunPrograms:
    """The programs of one command on one mesh, with the bytes resident beside each."""

    programs: dict[str, Program]
    resident: dict[str, int]  # program name -> bytes per chip the run holds but does not pass to it
    shapes: dict[str, Any]  # what the shapes were taken from (printed and saved)
    not_compiled: dict[str, str] = dataclasses.field(default_factory=dict)  # program name -> why not


def for_tpu(config: Config, attention: str = "config") -> Config:
    """The config with the attention a TPU run uses: `attention` ("config", "reference" or "pallas");
    the config's "auto" resolves to the Pallas kernels as on a TPU, not to this host's choice."""
    if attention not in ("config", "reference", "pallas"):
        raise ValueError(f"--attention: must be 'config', 'reference' or 'pallas', got {attention!r}")
    impl = config.model.attention_impl if attention == "config" else attention
    if impl == "auto":
        impl = "pallas"
    return dataclasses.replace(config, model=dataclasses.replace(config.model, attention_impl=impl))


# the learner's programs (`rl.loop.rl_programs`): block-diffusion rows for SDAR, single-stream for LLaDA/Dream
LEARNER_PROGRAMS = ("old_logprobs", "ref_logprobs", "policy_update", "old_values", "value_update")


def eval_programs(config: Config, mesh: Mesh | None, policy) -> tuple[dict[str, Program], nnx.State]:
    """The sampler programs of every point of the eval sweep (one `eval.chunk_tasks` chunk each),
    and the weights they stream (abstract)."""
    programs, streamed = {}, None
    rows = config.eval.chunk_tasks * config.eval.num_samples
    for strategy, top_k in zip(config.eval.strategies, config.eval.top_k):
        sampler = sampler_for(policy, eval_sampling(config, strategy, top_k), mesh=mesh)  # by the model's family
        streamed = sampler.abstract_params()
        for name, program in sampler.programs(rows, config.train.max_prompt_len).items():
            programs[f"eval/{strategy}/top_k={top_k}/{name}"] = program
    return programs, streamed


def bytes_not_shared(held: nnx.State, streamed: nnx.State) -> int:
    """Per-chip bytes of the `held` arrays that the sampler cannot stream as they are (a cast or a
    different layout makes it place a copy of its own)."""
    def extra(a, b):
        same = a.dtype == b.dtype and (a.sharding is None or a.sharding.is_equivalent_to(b.sharding, len(a.shape)))
        return 0 if same else bytes_per_chip(a)

    return sum(extra(a, b) for a, b in zip(jax.tree.leaves(held), jax.tree.leaves(streamed), strict=True))


def run_programs(config: Config, mesh: Mesh | None, command: str) -> RunPrograms:
    """Every jitted function `tradojax COMMAND` calls with this config on `mesh`, with abstract arguments."""
    if command not in COMMANDS:
        raise ValueError(f"--command: must be one of {COMMANDS}, got {command!r}")
    policy = abstract_model(config.model)
    graphdef, params = nnx.split(policy)
    train_params = abstract_placed(params, mesh, "train")
    bucket = prompt_bucket(config.train.max_prompt_len, config.sampling.prompt_buckets)
    shapes = {"prompt_bucket": bucket, "max_active": getattr(config.sampling, "max_active", None),
              "eval_rows": config.eval.chunk_tasks * config.eval.num_samples,
              "eval_new_tokens": config.eval.max_new_tokens or config.sampling.max_new_tokens}
    if command == "eval":  # the loaded weights stay resident beside the sampler's copy, if it makes one
        programs, streamed = eval_programs(config, mesh, policy)
        return RunPrograms(programs, dict.fromkeys(programs, bytes_not_shared(train_params, streamed)), shapes)

    rl = config.rl
    tx, value_tx = optimizers(config)
    opt_state = abstract_opt_state(tx, train_params, mesh)
    value = {}
    if rl.value_model:
        value_graphdef, value_params = nnx.split(nnx.eval_shape(lambda: ValueModel(config.model, rngs=nnx.Rngs(0))))
        value_params = abstract_placed(value_params, mesh, "train")
        value = {"value_graphdef": value_graphdef, "value_params": value_params,
                 "value_opt_state": abstract_opt_state(value_tx, value_params, mesh)}
    held = {"policy": bytes_per_chip(train_params), "policy_opt": bytes_per_chip(opt_state),
            "reference": bytes_per_chip(train_params) if rl.kl_reference == "initial" else 0,
            "value": bytes_per_chip(value.get("value_params", ())),
            "value_opt": bytes_per_chip(value.get("value_opt_state", ()))}
    rows = rl.num_tasks_per_step * rl.num_responses_per_task
    sampler = sampler_for(policy, rollout_sampling(config), mesh=mesh)
    programs = {f"rollout/{name}": p for name, p in sampler.programs(rows, config.train.max_prompt_len).items()}
    programs.update(rl_programs(config, mesh, graphdef, train_params, opt_state, prompt_length=bucket, **value))
    programs.update(eval_programs(config, mesh, policy)[0])
    everything = sum(held.values())
    args_held = {  # the trainer's state each learner program takes as arguments
        "old_logprobs": held["policy"], "ref_logprobs": held["reference"],
        "policy_update": held["policy"] + held["policy_opt"], "old_values": held["value"],
        "value_update": held["value"] + held["value_opt"]}
    resident = {name: everything - args_held.get(name, 0) for name in programs}
    shapes |= {"rollout_rows": rows, "new_tokens": config.sampling.max_new_tokens,
               "update_rows": config.train.batch_size, "micro_batch": config.train.micro_batch_size,
               "update_length": bucket + row_layout(config).response_copies * config.sampling.max_new_tokens}
    return RunPrograms(programs, resident, shapes)


# ----------------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CompiledProgram:
    name: str
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0  # outputs written into donated arguments (counted once in peak_bytes)
    temp_bytes: int = 0
    code_bytes: int = 0
    resident_bytes: int = 0  # held by the run beside this program (not among its arguments)
    compile_s: float = 0.0
    error: str = ""  # the compiler's refusal (e.g. out of HBM); the byte counts are then 0
    required_bytes: int = 0  # with an out-of-HBM error: what the compiler said the program needs
    same_as: str = ""  # an earlier program that lowers to the same text (compiled once)

    @property
    def peak_bytes(self) -> int:
        """Per-chip bytes live at once: arguments, outputs not aliased to them, temporaries, code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def total_bytes(self) -> int:
        return self.peak_bytes + self.resident_bytes


def oom_required_bytes(message: str) -> int:
    """The bytes an out-of-HBM compile error says the program needs (0 if it does not say), from
    XLA:TPU's "... memory required for HLO temporaries (40.54G) exceeds available HBM (31.24G)"."""
    found = re.search(r"required for [^(]*\(([\d.]+)([KMGT])\)", message)
    if not found:
        return 0
    return int(float(found.group(1)) * 2 ** (10 * "KMGT".index(found.group(2)) + 10))


def compile_programs(programs: dict[str, Program], resident: dict[str, int],
                     log: Callable[[str], None] = lambda line: None,
                     seen: dict[str, CompiledProgram] | None = None) -> list[CompiledProgram]:
    """Lowers every program, compiles each distinct one; an out-of-HBM refusal is a result, not an
    error. `seen` (lowered-text digest -> result) carries compiled programs across calls."""
    results, seen = [], {} if seen is None else seen
    for name, (fn, args, kwargs) in programs.items():
        start = time.perf_counter()
        lowered = fn.lower(*args, **kwargs)
        digest = hashlib.sha256(lowered.as_text().encode()).hexdigest()
        if digest in seen:
            earlier = seen[digest]
            results.append(dataclasses.replace(earlier, name=name, same_as=earlier.same_as or earlier.name,
                                               resident_bytes=resident.get(name, 0)))
            continue
        log(f"compiling {name} ...")
        result = CompiledProgram(name=name, resident_bytes=resident.get(name, 0))
        try:
            compiled = lowered.compile()
        except Exception as err:  # XLA reports HBM exhaustion as an error of the compile
            message = str(err)
            if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
                raise
            result.error = message.strip().splitlines()[0][:400]
            result.required_bytes = oom_required_bytes(result.error)
        else:
            memory = compiled.memory_analysis()
            result.argument_bytes = int(memory.argument_size_in_bytes)
            result.output_bytes = int(memory.output_size_in_bytes)
            result.alias_bytes = int(getattr(memory, "alias_size_in_bytes", 0))
            result.temp_bytes = int(memory.temp_size_in_bytes)
            result.code_bytes = int(memory.generated_code_size_in_bytes)
        result.compile_s = time.perf_counter() - start
        seen[digest] = result
        results.append(result)
    return results


def fits(result: CompiledProgram, hbm_bytes: int) -> bool:
    return not result.error and result.total_bytes <= hbm_bytes


def default_command(config_path: str) -> str:
    """"rl" for a config file with an `rl` section, else "eval"."""
    return "rl" if "rl" in load_config_dict(config_path) else "eval"


def slices_of(config: Config, topology: str | None) -> list[str]:
    if topology:
        return [topology]
    if not config.mesh.slices:
        raise ConfigError("mesh.slices: the config names no TPU slice; pass --topology (e.g. v5p:2x2x1)")
    return list(config.mesh.slices)


def compile_for_slice(config: Config, topology: str, command: str, *, only: tuple[str, ...] = (),
                      log: Callable[[str], None] = lambda line: None,
                      seen: dict[str, CompiledProgram] | None = None) -> tuple[Mesh, RunPrograms, list[CompiledProgram]]:
    """The config's mesh over `topology`'s chips, and every program of `command` compiled on it
    (`only`: name prefixes to keep)."""
    mesh = make_mesh(config.mesh, tpu_devices(topology))
    run = run_programs(config, mesh, command)
    programs = {n: p for n, p in run.programs.items() if not only or any(n.startswith(o) for o in only)}
    if not programs:
        skipped = [f"{n} ({why})" for n, why in run.not_compiled.items() if any(n.startswith(o) for o in only)]
        if skipped:
            raise ConfigError(f"--programs {','.join(only)}: " + "; ".join(skipped))
        raise ValueError(f"--programs {','.join(only)}: matches none of {', '.join(run.programs)}")
    return mesh, run, compile_programs(programs, run.resident, log, seen)


def report_rows(config_path: str, topology: str, mesh: Mesh, run: RunPrograms,
                results: list[CompiledProgram]) -> list[dict[str, Any]]:
    hbm = HBM_GIB[topology.split(":")[0]] * 2**30
    return [{"config": config_path, "topology": topology, "chips": mesh.size, "mesh": dict(mesh.shape),
             "program": r.name, "argument_bytes": r.argument_bytes, "output_bytes": r.output_bytes,
             "alias_bytes": r.alias_bytes, "temp_bytes": r.temp_bytes, "code_bytes": r.code_bytes,
             "peak_bytes": r.peak_bytes, "resident_bytes": r.resident_bytes, "total_bytes": r.total_bytes,
             "hbm_bytes": hbm, "fits": fits(r, hbm), "compile_s": round(r.compile_s, 2), "error": r.error,
             "required_bytes": r.required_bytes, "same_as": r.same_as, "shapes": run.shapes} for r in results]


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def print_table(report: list[dict[str, Any]]) -> None:
    width = max(len(r["program"]) for r in report)
    header = (f"{'program':<{width}} {'args GiB':>9} {'temp GiB':>9} {'out GiB':>8} {'peak GiB':>9} "
              f"{'+resident':>9} {'HBM %':>6} {'compile s':>9}  fits")
    print(header)
    print("-" * len(header))
    for r in report:
        if r["error"]:
            needs = f"needs {_gib(r['required_bytes'])} GiB: " if r["required_bytes"] else ""
            print(f"{r['program']:<{width}} {needs}{r['error'][:100]}  NO")
            continue
        print(f"{r['program']:<{width}} {_gib(r['argument_bytes']):>9} {_gib(r['temp_bytes']):>9} "
              f"{_gib(r['output_bytes']):>8} {_gib(r['peak_bytes']):>9} {_gib(r['resident_bytes']):>9} "
              f"{100 * r['total_bytes'] / r['hbm_bytes']:>6.1f} {r['compile_s']:>9.1f}  "
              f"{'yes' if r['fits'] else 'NO'}{' (= ' + r['same_as'] + ')' if r['same_as'] else ''}")


def main(argv: list[str]) -> int:
    config_path, overrides, rest = split_config_args(argv)
    parser = argparse.ArgumentParser(prog="tradojax aot", description=__doc__.splitlines()[0])
    parser.add_argument("--topology", help="a TPU slice, e.g. v5p:2x2x1, v5e:2x4, v6e:2x2 (default: the config's "
                                           "mesh.slices)")
    parser.add_argument("--command", choices=COMMANDS,
                        help="whose programs: rl (rollout, learner, periodic eval) or eval (default: rl when the "
                             "config file has an rl section)")
    parser.add_argument("--programs", default="", help="comma-separated program-name prefixes to compile (default: all)")
    parser.add_argument("--attention", choices=("config", "reference", "pallas"), default="config",
                        help="attention of the TPU program (default: the config's; its 'auto' means the Pallas "
                             "kernels, as on a TPU)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(rest)
    if config_path is None:
        parser.error("--config=FILE is required")
    config = for_tpu(load_config(config_path, overrides), args.attention)
    command = args.command or default_command(config_path)
    only = tuple(p for p in args.programs.split(",") if p)
    report: list[dict[str, Any]] = []
    status = 0
    topologies = slices_of(config, args.topology)
    for topology in topologies:  # a malformed or unknown slice is the user's error: say so before compiling
        try:
            tpu_devices(topology)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    for topology in topologies:
        generation = topology.split(":")[0]
        mesh, run, results = compile_for_slice(config, topology, command, only=only,
                                               log=lambda line: print(line, file=sys.stderr, flush=True))
        print(f"{config_path} ({command}): {config.model.num_params() / 1e9:.2f}B parameters, "
              f"{config.model.param_dtype} params, {config.model.compute_dtype} compute, remat={config.model.remat}, "
              f"attention={config.model.attention_impl}")
        print(f"topology {topology}: {mesh.size} chips, mesh {dict(mesh.shape)}, HBM {HBM_GIB[generation]} GiB per chip")
        print("shapes: " + ", ".join(f"{k} {v}" for k, v in run.shapes.items()))
        rows = report_rows(config_path, topology, mesh, run, results)
        print_table(rows)
        for name, why in run.not_compiled.items():
            if not only or any(name.startswith(o) for o in only):
                print(f"{name}: {why}")
        print()
        report.extend(rows)
        status = status or (0 if all(r["fits"] for r in rows) else 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Rollout throughput of the block-diffusion sampler against floors measured in the same run.

One SDAR-class model (default: 125M parameters, 12 layers of 768, 32k vocabulary, float32; prompt
64, 128 new tokens, block 4, 4 denoising steps). Two decoding modes:

  * static:  sampled (temperature 1, no top-k/top-p), low_confidence_static: one token per step;
  * dynamic: greedy (top_k = 1), low_confidence_dynamic with threshold 0.9.

The model's EOS is its mask id (never proposed), so every row generates all its tokens, and its LM
head is scaled up (`--head-scale`) so that greedy confidences look like a trained model's (with
random small weights every position is near-uniform and dynamic decoding degenerates to static).

Every (batch, mode) is compiled once, then run `--repeats` times, the repeats interleaved with
each other and with the floors, so that load from other processes on the host spreads over all of
them alike. Per run:

  * steady state, from the progress callback every `--chunk` iterations, the first chunk (which
    holds the prefill) excluded: tokens/s (tokens committed / time), seconds per forward, forwards
    per generated token of a row; complete runs also give the exact totals (forwards, save passes
    if the engine reports them, tokens/s with the prefill). `--measure-forwards N` ends each run
    after N steady forwards (a shared host cannot afford complete batch-64 runs);
  * the weight-bandwidth floor: time to read every streamed weight once (a jitted sum over the
    parameters the sampler streams, the embedding table excluded: a forward only gathers from it);
    `share of weight floor` = floor / seconds per forward (1.0 = bandwidth-bound at the floor);
  * the matmul floor of a forward: its matmul FLOPs (projections, MLP, attention over the live
    cache, LM head) / the FLOP/s of a jitted float32 matmul measured here; `share of matmul floor`
    likewise. A forward carrying a fused save also runs the decided block through the layers (2b
    tokens per row); the floor counts the forwards as run (`fused`: their share of the forwards).
    `step floor` counts only the b tokens a denoising step decides (the accounting before the save
    pass was fused: with one step per block, as greedy dynamic decoding mostly takes, it tops out
    near (L + H) / (2L + H) of the floor, L and H the layers' and the head's FLOPs per token);
  * the decode program's XLA compiler options (`--xla-options`): the package's choice by platform
    and size (`decode_xla_options`), XLA's defaults, or XLA:CPU's YNNPACK fusions off at every size,
    run side by side.

Medians over repeats are reported (and the best run, in the JSON). On CPU the sampler streams the
weights one array per layer (`per_layer_weights_pay`: no copy per forward); the compile time of the
first case's decode program is measured both ways (per-layer, as run, and the stacked scan), and the
host load (`os.getloadavg()`) at the start and the end is recorded: the 2-core host is shared.

    python benchmarks/rollout.py                  # the 125M model, batches 1 8 32 64, complete runs
    python benchmarks/rollout.py --repeats 2 --chunk 4 --measure-forwards 8   # the same, cut (shared host)
    python benchmarks/rollout.py --quick          # a tiny model, batches 1 and 2, one repeat (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from tradojax.config import ModelConfig, SamplingConfig  # noqa: E402
from tradojax.models.transformer import init_model  # noqa: E402
from tradojax.sampling.block_diffusion import (  # noqa: E402
    CPU_SMALL_DECODE_OPTIONS, BlockDiffusionSampler, cache_slots)

MODELS = {
    # the SDAR-class model of issue 13: 124.7M parameters
    "125m": ModelConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                        num_kv_heads=4, head_dim=64, max_position_embeddings=4096),
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, max_position_embeddings=512),
}

# The decode program's XLA compiler options: the package's choice (by platform and size), XLA's
# defaults, or XLA:CPU's YNNPACK fusions off whatever the size (to place the package's threshold).
XLA_OPTIONS = {"package": None, "xla-defaults": (), "ynn-off": CPU_SMALL_DECODE_OPTIONS}

MODES = {
    "static": dict(temperature=1.0, top_k=0, remasking_strategy="low_confidence_static"),
    "dynamic": dict(top_k=1, remasking_strategy="low_confidence_dynamic", dynamic_threshold=0.9),
}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def streamed_weights(params: nnx.State) -> list[jax.Array]:
    """Every parameter a forward reads in full: all but the embedding table (rows are gathered)."""
    return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            if "embed_tokens" not in jax.tree_util.keystr(path)]


class Floors:
    """The weight-read and matmul floors, timed on demand (interleaved with the rollouts). Each is
    compiled with every set of XLA options the decodes run with, and the fastest counts (a floor
    no option set the package uses could beat)."""

    def __init__(self, weights: list[jax.Array], matmul_size: int, xla_options: list[tuple]):
        self.weights = weights
        self.weight_bytes = sum(w.size * w.dtype.itemsize for w in weights)
        self.matmul_size = matmul_size
        self._a = jax.random.normal(jax.random.key(0), (matmul_size, matmul_size), jnp.float32)
        self._reads = [jax.jit(lambda ws: sum(jnp.sum(w) for w in ws), compiler_options=dict(o)) for o in xla_options]
        self._dots = [jax.jit(lambda x: x @ x, compiler_options=dict(o)) for o in xla_options]
        for read, dot in zip(self._reads, self._dots):
            read(weights).block_until_ready()
            dot(self._a).block_until_ready()
        self.read_seconds: list[float] = []
        self.matmul_seconds: list[float] = []

    def measure(self, repeats: int = 3) -> None:
        self.read_seconds.append(min(_timed(lambda: read(self.weights).block_until_ready())
                                     for read in self._reads for _ in range(repeats)))
        self.matmul_seconds.append(min(_timed(lambda: dot(self._a).block_until_ready())
                                       for dot in self._dots for _ in range(repeats)))

    @property
    def weight_read_seconds(self) -> float:
        return statistics.median(self.read_seconds)

    @property
    def matmul_flops_per_second(self) -> float:
        return 2 * self.matmul_size ** 3 / statistics.median(self.matmul_seconds)


def forward_flops(config: ModelConfig, rows: int, block: int, live_keys: float, saves: bool = False) -> float:
    """Matmul FLOPs of one cached decode forward: projections + MLP of `block` tokens per row,
    attention over `live_keys` keys (cache + block), the LM head of `block` tokens. A forward that
    `saves` (the fused save) also runs the decided block's `block` tokens through every layer (their
    K/V; attention over the cache and themselves), without the LM head."""
    c = config
    projections = 2 * c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 2 * 3 * c.hidden_size * c.intermediate_size
    attention = 4 * c.num_heads * c.head_dim * live_keys
    head = 2 * c.hidden_size * c.vocab_size
    flops = rows * block * (c.num_layers * (projections + mlp + attention) + head)
    if saves:
        flops += rows * block * c.num_layers * (projections + mlp + 4 * c.num_heads * c.head_dim * (live_keys - block))
    return float(flops)


def decode_compile_seconds(model, sampling: SamplingConfig, rows: int, prompt_length: int) -> dict:
    """Seconds to compile the sampler's decode program with the layer weights one array per layer
    (an unrolled layer loop: compile time grows with depth) and with the stacked scan."""
    seconds = {}
    for name, per_layer in (("per_layer", True), ("stacked", False)):
        fn, args, kwargs = BlockDiffusionSampler(model, sampling, per_layer=per_layer).programs(rows, prompt_length)["decode"]
        start = time.perf_counter()
        fn.lower(*args, **kwargs).compile()
        seconds[name] = time.perf_counter() - start
    return seconds


class _Measured(Exception):
    """Raised from the progress callback once a run has measured enough forwards."""


def run_once(sampler: BlockDiffusionSampler, prompts, chunk: int, measure_forwards: int) -> dict:
    """One `generate` call, timed at every chunk end. With `measure_forwards` > 0 the run stops once
    that many forwards have run after the first chunk (which holds the prefill, and compilation)."""
    marks: list[tuple[float, int, int, int]] = []  # (time, forwards, tokens generated, fused-save forwards)

    def progress(p):
        marks.append((time.perf_counter(), p.forwards, p.tokens_generated, p.save_forwards))
        if measure_forwards and p.forwards - marks[0][1] >= measure_forwards and p.rows_done < p.rows_total:
            raise _Measured

    start = time.perf_counter()
    complete = True
    try:
        rollout = sampler.generate(prompts, rng=0, iterations_per_call=chunk, progress=progress)
        jax.block_until_ready(rollout.tokens)
    except _Measured:
        complete = False
    wall = time.perf_counter() - start
    result = {"complete": complete, "wall_seconds": wall}
    if complete:
        result.update(generated=rollout.num_generated, forwards=int(rollout.num_forwards),
                      save_forwards=getattr(rollout, "save_forwards", None))
    if len(marks) >= 2:  # steady state: from the end of the first chunk to the last mark
        (t0, f0, g0, s0), (t1, f1, g1, s1) = marks[0], marks[-1]
        result.update(steady_seconds=t1 - t0, steady_forwards=f1 - f0, steady_tokens=g1 - g0, steady_save_forwards=s1 - s0)
        # the quietest chunk (the floors are each the best of 3 reads, so comparable to this)
        result["best_chunk_seconds_per_forward"] = min(
            (b[0] - a[0]) / (b[1] - a[1]) for a, b in zip(marks, marks[1:]) if b[1] > a[1])
    elif complete:  # one chunk: the whole run, prefill included
        result.update(steady_seconds=wall, steady_forwards=result["forwards"], steady_tokens=result["generated"],
                      steady_save_forwards=result["save_forwards"])
    return result


def host_facts(load_start, load_end) -> dict:
    """What a recorded result ran on, with the host's load average before and after (the machine is
    shared: other jobs may run alongside)."""
    return {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "jax": jax.__version__, "backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "load_average_start": load_start, "load_average_end": load_end,
            "note": "shared host: other jobs ran alongside (see the load averages)"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, batches 1 and 2, one repeat")
    parser.add_argument("--model", choices=sorted(MODELS), help="default: 125m (tiny with --quick)")
    parser.add_argument("--batches", type=int, nargs="+", help="default: 1 8 32 64 (1 2 with --quick)")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=sorted(MODES))
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, help="default: 128 (16 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed runs per case, interleaved (default 3, 1 with --quick)")
    parser.add_argument("--chunk", type=int, default=8, help="decode iterations per compiled call")
    parser.add_argument("--measure-forwards", type=int, default=0,
                        help="stop each run after this many steady-state forwards (0: run to the end); for a "
                             "shared host where complete batch-64 runs take too long")
    parser.add_argument("--head-scale", type=float, default=40.0,
                        help="LM head multiplier: greedy confidences of a trained model, not a random one")
    parser.add_argument("--xla-options", nargs="+", choices=sorted(XLA_OPTIONS), default=["package"],
                        help="decode programs' XLA options to run side by side (interleaved): the package's "
                             "choice, XLA's defaults, or YNNPACK fusions off at every size")
    parser.add_argument("--out", default="benchmarks/results/rollout.json")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()
    name = args.model or ("tiny" if args.quick else "125m")
    batches = args.batches or ([1, 2] if args.quick else [1, 8, 32, 64])
    max_new = args.max_new_tokens or (16 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 3)
    block = 4

    base = MODELS[name]
    config = dataclasses.replace(base, eos_token_id=base.mask_token_id)  # never stops early
    model = init_model(config, seed=0)
    model.lm_head[...] = model.lm_head[...] * args.head_scale
    params = nnx.split(model)[1]
    slots = cache_slots(args.prompt_length, block, max_new)
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, jax {jax.__version__} "
          f"({jax.default_backend()}), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, load {load_start}")
    print(f"{name}: {config.num_params() / 1e6:.1f}M parameters ({config.compute_dtype}), "
          f"{sum(w.nbytes for w in streamed_weights(params)) / 1e6:.1f} MB streamed per forward; prompt {args.prompt_length}, {max_new} new "
          f"tokens, block {block}, cache {slots} slots; {repeats} interleaved repeats")

    rng = np.random.RandomState(0)
    compile_seconds = None
    cases = {}
    for batch in batches:
        prompts = [rng.randint(4, config.vocab_size, size=args.prompt_length).tolist() for _ in range(batch)]
        for mode in args.modes:
            sampling = SamplingConfig(block_size=block, denoising_steps=block, max_new_tokens=max_new,
                                      prompt_buckets=(args.prompt_length,), **MODES[mode])
            if compile_seconds is None:
                compile_seconds = {"case": [batch, mode], **decode_compile_seconds(model, sampling, batch, args.prompt_length)}
            seen = set()
            for variant in args.xla_options:
                sampler = BlockDiffusionSampler(model, sampling, xla_options=XLA_OPTIONS[variant])
                options = sampler.decode_options(batch, args.prompt_length)
                if tuple(options.items()) in seen:  # the same program as a variant already run
                    continue
                seen.add(tuple(options.items()))
                start = time.perf_counter()
                run_once(sampler, prompts, args.chunk, args.measure_forwards)  # compile, warm up
                cases[(batch, mode, variant)] = {"sampler": sampler, "prompts": prompts, "runs": [],
                                                 "options": options,
                                                 "compile_and_first_run_seconds": time.perf_counter() - start}
    floors = Floors(streamed_weights(params), 256 if args.quick else 2048,
                    sorted({tuple(case["options"].items()) for case in cases.values()}))
    for repeat in range(repeats):
        floors.measure()
        for key, case in cases.items():
            case["runs"].append(run_once(case["sampler"], case["prompts"], args.chunk, args.measure_forwards))
    floors.measure()
    load_end = os.getloadavg()

    floor_seconds = floors.weight_read_seconds
    flops_per_second = floors.matmul_flops_per_second
    average_live = args.prompt_length + max_new / 2 + block
    results = []
    for (batch, mode, variant), case in cases.items():
        runs = case["runs"]
        complete = [r for r in runs if r["complete"]]
        if any((r["forwards"], r["generated"]) != (complete[0]["forwards"], complete[0]["generated"]) for r in complete):
            raise RuntimeError(f"batch {batch} {mode} {variant}: runs differ in forwards or tokens: {runs}")
        seconds = statistics.median(r["steady_seconds"] / r["steady_forwards"] for r in runs)
        tokens_per_forward = sum(r["steady_tokens"] for r in runs) / sum(r["steady_forwards"] for r in runs)
        # the matmul floor of the forwards as run (a fused save's forward carries 2b tokens per row
        # through the layers), and of the b tokens a step decides (the pre-fusion accounting)
        saving_share = sum(r["steady_save_forwards"] for r in runs) / sum(r["steady_forwards"] for r in runs)
        step_floor = forward_flops(config, batch, block, average_live) / flops_per_second
        matmul_floor = ((1 - saving_share) * step_floor
                        + saving_share * forward_flops(config, batch, block, average_live, saves=True) / flops_per_second)
        row = {
            "batch": batch, "mode": mode, "xla_options": variant, "decode_xla_options": case["options"],
            "complete_runs": len(complete),
            "generated_tokens": complete[0]["generated"] if complete else None,
            "forwards": complete[0]["forwards"] if complete else None,
            "save_forwards": complete[0]["save_forwards"] if complete else None,
            # forwards per generated token of one row (steady state; exact totals in forwards/generated_tokens)
            "forwards_per_token": batch / tokens_per_forward if tokens_per_forward else None,
            "tokens_per_second": statistics.median(r["steady_tokens"] / r["steady_seconds"] for r in runs),
            "tokens_per_second_incl_prefill": (statistics.median(r["generated"] / r["wall_seconds"] for r in complete)
                                               if complete else None),
            "seconds_per_forward": seconds,
            "share_of_weight_floor": floor_seconds / seconds,
            "best_chunk_seconds_per_forward": min((r.get("best_chunk_seconds_per_forward", seconds) for r in runs)),
            "fused_save_share_of_forwards": saving_share,
            "matmul_floor_seconds_per_forward": matmul_floor,
            "share_of_matmul_floor": matmul_floor / seconds,
            "step_matmul_floor_seconds_per_forward": step_floor,
            "share_of_step_matmul_floor": step_floor / seconds,
            "best_chunk_share_of_weight_floor": floor_seconds / min(
                r.get("best_chunk_seconds_per_forward", seconds) for r in runs),
            "best_chunk_share_of_matmul_floor": matmul_floor / min(
                r.get("best_chunk_seconds_per_forward", seconds) for r in runs),
            "compile_and_first_run_seconds": case["compile_and_first_run_seconds"],
            "runs": runs,
        }
        results.append(row)
    _print_table(results, floor_seconds, flops_per_second)
    print(f"decode compile (batch {compile_seconds['case'][0]}, {compile_seconds['case'][1]}): "
          f"{compile_seconds['per_layer']:.1f} s with the weights one array per layer (as run here), "
          f"{compile_seconds['stacked']:.1f} s with the stacked scan")
    print(f"host load (1, 5, 15 min) at start {load_start}, at end {load_end}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python benchmarks/rollout.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "host": host_facts(load_start, load_end),
        "model": {"name": name, "params": config.num_params(), "dtype": config.compute_dtype,
                  "streamed_weight_bytes": floors.weight_bytes, "head_scale": args.head_scale},
        "sampling": {"prompt_length": args.prompt_length, "max_new_tokens": max_new, "block_size": block,
                     "denoising_steps": block, "modes": {m: MODES[m] for m in args.modes}},
        "floors": {"weight_read_seconds": floor_seconds, "weight_read_bytes_per_second": floors.weight_bytes / floor_seconds,
                   "weight_read_seconds_each": floors.read_seconds,
                   "matmul_flops_per_second": flops_per_second, "matmul_size": floors.matmul_size,
                   "matmul_seconds_each": floors.matmul_seconds},
        "per_layer_weights": cases[next(iter(cases))]["sampler"].per_layer,
        "decode_compile_seconds": compile_seconds,
        "repeats": repeats, "chunk": args.chunk, "measure_forwards": args.measure_forwards,
        "results": results,
    }, indent=2))
    print(f"\nwrote {out}")
    return 0


def _print_table(results: list[dict], floor_seconds: float, flops_per_second: float) -> None:
    print(f"\nweight-read floor {floor_seconds * 1e3:.1f} ms per forward; matmul {flops_per_second / 1e9:.1f} GFLOP/s")
    print("(shares of a floor: median over runs; in brackets the quietest chunk's)")
    print(f"{'batch':>5} {'mode':>8} {'xla options':>12} {'fwd':>5} {'fwd/tok':>8} {'tok/s':>9} {'ms/fwd':>9} "
          f"{'weight floor':>14} {'matmul floor':>14} {'fused':>6} {'step floor':>11}")
    for r in results:
        print(f"{r['batch']:>5} {r['mode']:>8} {r['xla_options']:>12} {str(r['forwards'] or '-'):>5} {r['forwards_per_token']:>8.2f} "
              f"{r['tokens_per_second']:>9.1f} {r['seconds_per_forward'] * 1e3:>9.2f} "
              f"{r['share_of_weight_floor']:>6.2f} ({r['best_chunk_share_of_weight_floor']:.2f}) "
              f"{r['share_of_matmul_floor']:>6.2f} ({r['best_chunk_share_of_matmul_floor']:.2f}) "
              f"{r['fused_save_share_of_forwards']:>6.2f} {r['share_of_step_matmul_floor']:>11.2f}")


if __name__ == "__main__":
    sys.exit(main())

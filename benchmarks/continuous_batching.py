"""Continuous batching against one batch on a long-tailed mix of response lengths (issue 12, item 6).

Most rows stop early with a stop token and a few run to `max_new_tokens` (lengths differing 10x or
more). The one-batch engine (`max_active` >= rows) keeps every row resident and runs a forward over
all of them until the longest finishes; continuous batching keeps `max_active` rows resident and
refills a slot as soon as its row finishes. Both give the same tokens (checked here, as the tests do).

The mix is made deterministic from a random SDAR-class model (default: the 125M model of
`benchmarks/rollout.py`, its LM head scaled so greedy confidences look trained) by choosing prompts:
one greedy run over candidate prompts (no stop token) gives their responses; `--long` of them are
the long rows, and `--short` others each contribute a stop token: a token of their response at a
position in [`--short-from`, `--short-tokens`) (default [4, 8)) that no long response holds
(`choose_rows`). Decoding: greedy, low_confidence_dynamic (threshold 0.9), block 4, those stop tokens.

Per engine, after a compile-and-warm-up run, `--repeats` complete runs interleaved with the other
engine: generated tokens/s (prefill included), decode forwards, and device memory: the KV cache the
decode state holds (2 x layers x resident slots x cache length x kv_heads x head_dim x bytes) and the
compiled decode program's arguments + temporaries (`memory_analysis`). The host load
(`os.getloadavg()`) is recorded at the start and the end: the 2-core host is shared with other jobs.

    python benchmarks/continuous_batching.py                 # 125M model, 14 short + 2 long rows, max_active 4
    python benchmarks/continuous_batching.py --quick         # a tiny model (seconds)
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
import numpy as np  # noqa: E402

from benchmarks.rollout import MODELS, host_facts  # noqa: E402
from tradojax.config import SamplingConfig  # noqa: E402
from tradojax.models.transformer import init_model  # noqa: E402
from tradojax.sampling.block_diffusion import BlockDiffusionSampler, cache_slots  # noqa: E402

BLOCK = 4
GREEDY_DYNAMIC = dict(top_k=1, remasking_strategy="low_confidence_dynamic", dynamic_threshold=0.9)


def choose_rows(model, config, args) -> tuple[list[list[int]], list[int], dict]:
    """(prompts, stop tokens, selection facts) from one greedy run over candidate prompts without a
    stop token: the first `args.long` candidates are the long rows; each further candidate becomes a
    short row with, as a stop token, its response's token at the first position in
    [short_from, short_tokens) whose token no long row's response holds (candidates with none are
    skipped), until `args.short` short rows. A short row stops at its own token or earlier (at
    another short row's token); the long rows hold none of them and run to the cap."""
    rng = np.random.RandomState(args.seed)
    candidates = [rng.randint(4, config.vocab_size, size=args.prompt_length).tolist()
                  for _ in range(args.candidates)]
    sampling = SamplingConfig(block_size=BLOCK, denoising_steps=BLOCK, max_new_tokens=args.max_new_tokens,
                              prompt_buckets=(args.prompt_length,), max_active=len(candidates), **GREEDY_DYNAMIC)
    responses = BlockDiffusionSampler(model, sampling).generate(candidates, rng=0).to_numpy().responses()
    long_tokens = {t for r in responses[: args.long] for t in r}
    short, stops = [], []
    for prompt, response in zip(candidates[args.long:], responses[args.long:]):
        position = next((i for i in range(args.short_from, min(args.short_tokens, len(response)))
                         if response[i] not in long_tokens), None)
        if position is not None and len(short) < args.short:
            short.append(prompt)
            stops.append(response[position])
    if len(short) < args.short:
        raise SystemExit(f"only {len(short)} of {args.candidates} candidates can stop early; raise --candidates")
    rows = short + candidates[: args.long]
    order = np.random.RandomState(args.seed + 1).permutation(len(rows))
    facts = {"candidates": args.candidates, "stop_tokens": sorted(set(stops))}
    return [rows[i] for i in order], sorted(set(stops)), facts


def decode_memory(sampler: BlockDiffusionSampler, rows: int, prompt_length: int) -> dict:
    """The decode state's KV-cache bytes and the compiled decode program's argument + temp bytes."""
    fn, args, kwargs = sampler.programs(rows, prompt_length)["decode"]
    state = args[2]
    cache_bytes = 2 * state.k.size * state.k.dtype.itemsize
    memory = fn.lower(*args, **kwargs).compile().memory_analysis()
    return {"resident_slots": int(state.k.shape[1]), "kv_cache_bytes": int(cache_bytes),
            "decode_argument_plus_temp_bytes": int(memory.argument_size_in_bytes + memory.temp_size_in_bytes)}


def timed_run(sampler: BlockDiffusionSampler, prompts) -> tuple[dict, object]:
    start = time.perf_counter()
    rollout = sampler.generate(prompts, rng=0)
    jax.block_until_ready(rollout.tokens)
    wall = time.perf_counter() - start
    return {"wall_seconds": wall, "generated": rollout.num_generated, "forwards": int(rollout.num_forwards),
            "save_forwards": int(rollout.save_forwards), "prefill_forwards": int(rollout.prefill_forwards),
            "tokens_per_second": rollout.num_generated / wall}, rollout.to_numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 8 short + 2 long rows, one repeat")
    parser.add_argument("--model", choices=sorted(MODELS), help="default: 125m (tiny with --quick)")
    parser.add_argument("--short", type=int, help="rows that stop early (default 14; 8 with --quick)")
    parser.add_argument("--long", type=int, help="rows that run to max_new_tokens (default 2; 2 with --quick)")
    parser.add_argument("--short-tokens", type=int, default=8,
                        help="a short row stops at a position in [--short-from, this)")
    parser.add_argument("--short-from", type=int, help="default: --short-tokens / 2 (0 with --quick)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--candidates", type=int, help="prompts searched for the mix (default: rows + 8; 6 x rows with --quick)")
    parser.add_argument("--max-active", type=int, nargs="+", default=[4], help="continuous-batching slots")
    parser.add_argument("--repeats", type=int, help="timed runs per engine, interleaved (default 2, 1 with --quick)")
    parser.add_argument("--head-scale", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/continuous_batching.json")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()
    name = args.model or ("tiny" if args.quick else "125m")
    args.short = args.short or (8 if args.quick else 14)
    if args.short_from is None:
        args.short_from = 0 if args.quick else args.short_tokens // 2
    args.long = args.long or 2
    args.candidates = args.candidates or (6 * (args.short + args.long) if args.quick else args.short + args.long + 8)
    repeats = args.repeats or (1 if args.quick else 2)

    base = MODELS[name]
    config = dataclasses.replace(base, eos_token_id=base.mask_token_id)  # stops come from stop_token_ids only
    model = init_model(config, seed=0)
    model.lm_head[...] = model.lm_head[...] * args.head_scale
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, jax {jax.__version__} "
          f"({jax.default_backend()}), load {load_start}")
    start = time.perf_counter()
    prompts, stops, facts = choose_rows(model, config, args)
    facts["seconds"] = time.perf_counter() - start
    rows = len(prompts)
    print(f"{name}: {config.num_params() / 1e6:.1f}M parameters; {rows} rows ({args.short} short, {args.long} long), "
          f"{len(stops)} stop tokens (mix chosen in {facts['seconds']:.0f} s)")

    engines = {"one batch": rows, **{f"continuous (max_active {a})": a for a in args.max_active}}
    cases = {}
    for engine, max_active in engines.items():
        sampling = SamplingConfig(block_size=BLOCK, denoising_steps=BLOCK, max_new_tokens=args.max_new_tokens,
                                  prompt_buckets=(args.prompt_length,), max_active=max_active,
                                  stop_token_ids=tuple(stops), **GREEDY_DYNAMIC)
        sampler = BlockDiffusionSampler(model, sampling)
        start = time.perf_counter()
        _, rollout = timed_run(sampler, prompts)  # compile, warm up
        cases[engine] = {"sampler": sampler, "max_active": max_active, "runs": [], "rollout": rollout,
                         "compile_and_first_run_seconds": time.perf_counter() - start,
                         "memory": decode_memory(sampler, rows, args.prompt_length)}
    reference = cases["one batch"]["rollout"]
    for engine, case in cases.items():  # the same answers whatever max_active
        for field in ("tokens", "lengths", "trace"):
            if not np.array_equal(getattr(case["rollout"], field), getattr(reference, field)):
                raise RuntimeError(f"{engine}: {field} differ from the one-batch engine's")
    lengths = np.asarray(reference.lengths)
    for _ in range(repeats):
        for case in cases.values():
            case["runs"].append(timed_run(case["sampler"], prompts)[0])
    load_end = os.getloadavg()

    results = []
    one_batch = statistics.median(r["tokens_per_second"] for r in cases["one batch"]["runs"])
    for engine, case in cases.items():
        tokens_per_second = statistics.median(r["tokens_per_second"] for r in case["runs"])
        results.append({
            "engine": engine, "max_active": case["max_active"], "generated_tokens": case["runs"][0]["generated"],
            "forwards": case["runs"][0]["forwards"], "prefill_forwards": case["runs"][0]["prefill_forwards"],
            "tokens_per_second": tokens_per_second, "speedup_vs_one_batch": tokens_per_second / one_batch,
            **case["memory"],
            "memory_vs_one_batch": case["memory"]["kv_cache_bytes"] / cases["one batch"]["memory"]["kv_cache_bytes"],
            "compile_and_first_run_seconds": case["compile_and_first_run_seconds"], "runs": case["runs"]})

    print(f"\nresponse lengths: min {lengths.min()}, median {int(np.median(lengths))}, mean {lengths.mean():.1f}, "
          f"max {lengths.max()} (max / median {lengths.max() / max(1, np.median(lengths)):.1f}); "
          f"{int((lengths >= args.max_new_tokens).sum())} rows at the cap")
    print(f"{'engine':>26} {'slots':>5} {'fwd':>5} {'tok/s':>8} {'x':>6} {'KV cache MB':>11} {'decode MB':>9}")
    for r in results:
        print(f"{r['engine']:>26} {r['resident_slots']:>5} {r['forwards']:>5} {r['tokens_per_second']:>8.1f} "
              f"{r['speedup_vs_one_batch']:>6.2f} {r['kv_cache_bytes'] / 1e6:>11.1f} "
              f"{r['decode_argument_plus_temp_bytes'] / 1e6:>9.1f}")
    print(f"host load (1, 5, 15 min) at start {load_start}, at end {load_end}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python benchmarks/continuous_batching.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "host": host_facts(load_start, load_end),
        "model": {"name": name, "params": config.num_params(), "dtype": config.compute_dtype,
                  "head_scale": args.head_scale},
        "sampling": {"prompt_length": args.prompt_length, "max_new_tokens": args.max_new_tokens, "block_size": BLOCK,
                     **GREEDY_DYNAMIC, "stop_token_ids": stops,
                     "cache_slots_per_row": cache_slots(args.prompt_length, BLOCK, args.max_new_tokens)},
        "mix": {**facts, "rows": rows, "short": args.short, "long": args.long, "short_tokens": args.short_tokens,
                "lengths": lengths.tolist()},
        "repeats": repeats,
        "results": results,
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

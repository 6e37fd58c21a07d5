"""Rollout throughput: cached vs uncached block-diffusion decoding, against hardware floors.

For each model (the tiny test model and a ~100M-parameter one), batch size and mode, one rollout
is run with a fixed amount of work (greedy static decoding, b = 4, 4 steps, no early stop: the
benchmark model's EOS is the mask id, which the sampler never proposes). The engine is driven in
chunks of iterations; the time between the end of the first chunk (which includes compilation)
and every later chunk end gives the steady-state seconds per forward (the best chunk: the host may
be busy with other work; the median is in the JSON). From it:

  * tokens/s = generated tokens / (forwards * seconds per forward)  (prefill excluded)
  * tokens per forward = generated tokens / batched forwards
  * the bandwidth floor of a forward = streamed weight bytes / measured memory bandwidth (a large
    numpy copy, read + write), and how far the measured forward is above it;
  * the compute floor = matmul FLOPs of the forward / measured matmul FLOP/s (a large jitted dot).

Expensive uncached runs may be cut after `--max-measured-forwards` steady-state forwards (their
forward count does not depend on the weights: it is the one complete runs are checked against).

    python benchmarks/rollout.py            # both models, batches 1/8/32/64 (~10 min on 2 cores)
    python benchmarks/rollout.py --quick    # tiny model only, batches 1/8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tradojax.config import ModelConfig, SamplingConfig  # noqa: E402
from tradojax.models.transformer import init_model  # noqa: E402
from tradojax.sampling.block_diffusion import BlockDiffusionSampler, cache_slots, prompt_bucket  # noqa: E402

MODELS = {
    "tiny": ModelConfig(),
    # ~100M: Qwen3-style, 8 layers of 768 (12 heads, 4 KV heads), 32k vocabulary, untied head
    "100m": ModelConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=8, num_heads=12,
                        num_kv_heads=4, head_dim=64, max_position_embeddings=4096),
}


class _Enough(Exception):
    """Raised from the progress callback to cut an expensive run once it has been measured."""


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a large numpy copy (each byte read once and written once)."""
    source = np.ones(megabytes * (1 << 20) // 4, np.float32)
    target = np.empty_like(source)
    np.copyto(target, source)
    best = min(_timed(lambda: np.copyto(target, source)) for _ in range(repeats))
    return 2 * source.nbytes / best


def matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a jitted float32 [size, size] @ [size, size]."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    dot = jax.jit(lambda x, y: x @ y)
    dot(a, a).block_until_ready()
    best = min(_timed(lambda: dot(a, a).block_until_ready()) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def streamed_weight_bytes(config: ModelConfig) -> int:
    """Parameter bytes a forward reads in full (every matrix; the embedding table is only gathered)."""
    embedding = config.vocab_size * config.hidden_size
    return (config.num_params() - embedding) * 4  # float32


def forward_flops(config: ModelConfig, rows: int, query_tokens: int, key_tokens: int, head_tokens: int) -> float:
    """Matmul FLOPs of one batched forward: projections + MLP over `query_tokens` per row, attention
    over `key_tokens`, the LM head over `head_tokens` per row."""
    c = config
    d, hd = c.hidden_size, c.head_dim
    per_token_layer = 2 * (d * hd * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * d * c.intermediate_size)
    attention = 4 * c.num_heads * hd * key_tokens  # scores + weighted values, per query token per layer
    body = rows * query_tokens * c.num_layers * (per_token_layer + attention)
    head = rows * head_tokens * 2 * d * c.vocab_size
    return float(body + head)


def run_one(model, config: ModelConfig, sampling: SamplingConfig, prompts, cached: bool, chunk: int,
            max_measured: int | None) -> dict:
    sampler = BlockDiffusionSampler(model, sampling, cached=cached)
    marks: list[tuple[float, int]] = []

    def progress(p):
        marks.append((time.perf_counter(), p.forwards))
        if max_measured is not None and len(marks) >= 2 and marks[-1][1] - marks[0][1] >= max_measured \
                and p.rows_done < p.rows_total:
            raise _Enough

    start = time.perf_counter()
    complete = True
    try:
        rollout = sampler.generate(prompts, rng=0, progress=progress, iterations_per_call=chunk)
        jax.block_until_ready(rollout.tokens)
        generated, forwards = rollout.num_generated, rollout.num_forwards
    except _Enough:
        complete = False
        generated = forwards = None
    total = time.perf_counter() - start
    if len(marks) < 2:
        raise RuntimeError("run too short to measure: lower the chunk size")
    # per-forward time of every chunk after the first (which includes compilation); the best one
    # is the least disturbed by other work on the host
    rates = [(t1 - t0) / (f1 - f0) for (t0, f0), (t1, f1) in zip(marks[:-1], marks[1:]) if f1 > f0]
    return {"seconds_per_forward": min(rates), "median_seconds_per_forward": float(np.median(rates)),
            "measured_forwards": marks[-1][1] - marks[0][1], "complete": complete,
            "generated": generated, "forwards": forwards, "wall_seconds_incl_compile": total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, batches 1 and 8")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="default: tiny 100m (tiny with --quick)")
    parser.add_argument("--batches", type=int, nargs="+", help="default: 1 8 32 64 (1 8 with --quick)")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, nargs=2, default=[64, 16], metavar=("TINY", "100M"),
                        help="tokens to generate for tiny and 100m")
    parser.add_argument("--max-measured-forwards", type=int, default=8,
                        help="cut 100m runs after this many steady-state forwards (0: never)")
    parser.add_argument("--out", default="benchmarks/results/rollout.json")
    args = parser.parse_args(argv)
    models = args.models or (["tiny"] if args.quick else ["tiny", "100m"])
    batches = args.batches or ([1, 8] if args.quick else [1, 8, 32, 64])

    bandwidth = memory_bandwidth()
    flops = matmul_flops()
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, jax {jax.__version__} "
          f"({jax.default_backend()}); memory bandwidth {bandwidth / 1e9:.1f} GB/s (numpy copy), "
          f"matmul {flops / 1e9:.1f} GFLOP/s (jitted 2048^2 f32)")

    results = []
    rng = np.random.RandomState(0)
    for name in models:
        base = MODELS[name]
        config = dataclasses.replace(base, eos_token_id=base.mask_token_id)  # never stops early
        model = init_model(config, seed=0)
        max_new = args.max_new_tokens[0] if name == "tiny" else args.max_new_tokens[1]
        sampling = SamplingConfig(block_size=4, denoising_steps=4, top_k=1, remasking_strategy="low_confidence_static",
                                  max_new_tokens=max_new, prompt_buckets=(args.prompt_length,))
        weights = streamed_weight_bytes(config)
        slots = cache_slots(prompt_bucket(args.prompt_length, sampling.prompt_buckets), 4, max_new)
        print(f"\n{name}: {config.num_params() / 1e6:.1f}M parameters, {weights / 1e6:.1f} MB streamed per forward, "
              f"prompt {args.prompt_length}, {max_new} new tokens, canvas/cache {slots} slots")
        for batch in batches:
            prompts = [rng.randint(4, config.vocab_size, size=args.prompt_length).tolist() for _ in range(batch)]
            row = {"model": name, "params": config.num_params(), "batch": batch}
            for cached in (True, False):
                cut = args.max_measured_forwards if (name != "tiny" and args.max_measured_forwards) else None
                chunk = 4 if name == "tiny" else 1
                measured = run_one(model, config, sampling, prompts, cached, chunk, cut)
                expected = _expected_forwards(max_new, args.prompt_length, cached)
                if measured["complete"]:
                    forwards, generated = measured["forwards"], measured["generated"]
                    if (forwards, generated) != (expected, batch * max_new):
                        raise RuntimeError(f"{name} batch {batch}: {forwards} forwards / {generated} tokens, "
                                           f"expected {expected} / {batch * max_new}")
                else:
                    forwards, generated = expected, batch * max_new
                seconds = measured["seconds_per_forward"]
                tokens_per_forward = generated / forwards
                if cached:
                    step_flops = forward_flops(config, batch, 4, slots + 4, 4)
                else:
                    step_flops = forward_flops(config, batch, slots, slots, 4)
                floor = weights / bandwidth
                compute_floor = step_flops / flops
                mode = "cached" if cached else "uncached"
                row[mode] = {
                    "forwards": forwards, "generated_tokens": generated, "tokens_per_forward": tokens_per_forward,
                    "tokens_per_forward_per_row": tokens_per_forward / batch,
                    "seconds_per_forward": seconds, "tokens_per_second": tokens_per_forward / seconds,
                    "median_seconds_per_forward": measured["median_seconds_per_forward"],
                    "bandwidth_floor_seconds_per_forward": floor, "times_bandwidth_floor": seconds / floor,
                    "compute_floor_seconds_per_forward": compute_floor, "times_compute_floor": seconds / compute_floor,
                    "measured_forwards": measured["measured_forwards"], "complete_run": measured["complete"],
                    "wall_seconds_incl_compile": measured["wall_seconds_incl_compile"],
                }
            row["speedup_cached_over_uncached"] = row["cached"]["tokens_per_second"] / row["uncached"]["tokens_per_second"]
            results.append(row)
            _print_row(row)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "host": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                 "jax": jax.__version__, "backend": jax.default_backend(),
                 "memory_bandwidth_bytes_per_second": bandwidth, "matmul_flops_per_second": flops},
        "sampling": {"block_size": 4, "denoising_steps": 4, "strategy": "low_confidence_static", "top_k": 1,
                     "prompt_length": args.prompt_length},
        "results": results,
    }, indent=2))
    print(f"\nwrote {out}")
    return 0


def _expected_forwards(max_new: int, prompt_length: int, cached: bool) -> int:
    """Greedy static decoding with b = steps = 4 and no early stop: one denoising step per token
    (left to right; the last block stops once the cap is reached) plus, cached, one save pass per
    block that is followed by another."""
    blocks = -(-((prompt_length % 4) + max_new) // 4)
    return max_new + (blocks - 1 if cached else 0)


_HEADER_PRINTED = False


def _print_row(row: dict) -> None:
    global _HEADER_PRINTED
    if not _HEADER_PRINTED:
        print(f"{'model':>5} {'batch':>5} {'mode':>8} {'fwd':>4} {'tok/fwd':>8} {'ms/fwd':>9} {'tok/s':>9} "
              f"{'x bw floor':>10} {'x flop floor':>12} {'cached/uncached':>15}")
        _HEADER_PRINTED = True
    for mode in ("cached", "uncached"):
        r = row[mode]
        speedup = f"{row['speedup_cached_over_uncached']:.2f}x" if mode == "cached" else ""
        cut = "" if r["complete_run"] else "*"
        print(f"{row['model']:>5} {row['batch']:>5} {mode:>8} {r['forwards']:>4}{cut:1}{r['tokens_per_forward']:>7.2f} "
              f"{r['seconds_per_forward'] * 1e3:>9.2f} {r['tokens_per_second']:>9.1f} "
              f"{r['times_bandwidth_floor']:>10.1f} {r['times_compute_floor']:>12.1f} {speedup:>15}")


if __name__ == "__main__":
    sys.exit(main())

"""Speed and greedy agreement of the full-attention sampler's caches against its uncached mode.

Tiny random LLaDA and Dream models (2 layers of 128, vocabulary 1024, float32), 8 prompts of 32
tokens, gen_length 64 in blocks of 16, 64 steps (one token per step), greedy, static remasking,
confidence target. EOS and pad are the mask id, which is never proposed, so every row decodes its
whole canvas. Modes: `none` (a full forward per step), `prefix` (Fast-dLLM prefix cache, refreshed
once per block, forwarding the block and everything after it), `prefix+h16` (the same with
further_horizon 16) and `dual` (prefix and suffix cached, only the block forwarded).

Per mode: tokens/s (generated tokens / wall time of `generate`, compiled beforehand, median of
`--repeats`), and the share of generated tokens (and of whole rows) equal to the uncached mode's.
Random weights give near-flat logits, so stale caches flip greedy choices more often than they
would in a trained model: the agreement here is a pessimistic figure.

    python benchmarks/full_diffusion.py            # prints the table, writes benchmarks/results/full_diffusion.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

MODES = {
    "none": dict(cache="none"),
    "prefix": dict(cache="prefix"),
    "prefix+h16": dict(cache="prefix", further_horizon=16),
    "dual": dict(cache="dual"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "full_diffusion.json"))
    args = parser.parse_args()

    import jax

    from tradojax.config import ModelConfig
    from tradojax.models.transformer import init_model
    from tradojax.sampling.full_diffusion import FullDiffusionConfig, FullDiffusionSampler

    rng = np.random.RandomState(0)
    prompts = [rng.randint(4, 1024, size=32).tolist() for _ in range(8)]
    runs = []  # (family, mode, sampler): all compiled first, then the repeats interleaved over them
    for family in ("llada", "dream"):
        config = ModelConfig(family=family, vocab_size=1024, hidden_size=128, intermediate_size=384, num_layers=2,
                             num_heads=4, num_kv_heads=4, head_dim=32, qk_norm=False, qkv_bias=family == "dream",
                             mask_token_id=3, eos_token_id=3, pad_token_id=3)
        model = init_model(config, seed=0)
        for mode, fields in MODES.items():
            settings = FullDiffusionConfig(gen_length=64, block_length=16, steps=64, temperature=0.0,
                                           remasking="static", target="confidence", **fields)
            sampler = FullDiffusionSampler(model, settings)
            runs.append((family, mode, sampler, sampler.generate(prompts, rng=0)))  # compiles
    seconds = {i: [] for i in range(len(runs))}
    for _ in range(args.repeats):  # interleaved, so that load from other processes hits every mode alike
        for i, (_, _, sampler, _) in enumerate(runs):
            start = time.perf_counter()
            sampler.generate(prompts, rng=0)
            seconds[i].append(time.perf_counter() - start)
    results, reference = [], {}
    for i, (family, mode, sampler, rollout) in enumerate(runs):
        tokens = np.asarray(rollout.tokens)
        reference.setdefault(family, tokens)  # "none" comes first
        generated = int(np.asarray(rollout.lengths).sum())
        median = statistics.median(seconds[i])
        results.append({
            "family": family, "mode": mode, "tokens_per_s": generated / median, "seconds": median,
            "forwards": rollout.num_forwards, "full_forwards": sampler.last_full_forwards,
            "token_agreement": float(np.mean(tokens == reference[family])),
            "row_agreement": float(np.mean(np.all(tokens == reference[family], axis=1))),
        })
    baseline = {r["family"]: r["tokens_per_s"] for r in results if r["mode"] == "none"}
    header = (f"{'model':6} {'mode':11} {'tokens/s':>9} {'speed-up':>8} {'forwards (full)':>16} "
              f"{'tokens = uncached':>18} {'rows = uncached':>16}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['family']:6} {r['mode']:11} {r['tokens_per_s']:9.1f} {r['tokens_per_s'] / baseline[r['family']]:7.2f}x "
              f"{r['forwards']:>9} ({r['full_forwards']:>3}) {100 * r['token_agreement']:17.1f}% "
              f"{100 * r['row_agreement']:15.1f}%")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": jax.devices()[0].device_kind, "prompts": 8, "prompt_length": 32, "gen_length": 64,
            "block_length": 16, "steps": 64, "repeats": args.repeats}
    out.write_text(json.dumps({"settings": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

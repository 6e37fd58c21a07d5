"""What bounds a batch-1 decode forward on this backend: a block's few rows times one weight matrix.

A batch-1 forward of the block-diffusion sampler multiplies `block` (4) rows by every weight matrix.
Its ideal cost is reading each weight once; this script measures, side by side with interleaved
repeats, how close the available kernels come to that for the 125M benchmark model's largest
matrices (float32): the weight-read floor (a jitted sum over the matrix) against XLA's matmul, XLA's
matmul on the transposed weight, a multiply-reduce that XLA fuses, and numpy's BLAS. Every XLA case
is compiled twice: with XLA's defaults and with the options the sampler compiles small CPU decodes
with (`decode_xla_options`: YNNPACK fusions off).

Then the whole model: one batch-1 block forward of the 125M model (4 tokens over a 196-slot cache
holding 96 tokens, the layer weights one array per layer as the sampler streams them) against a chain
of exactly its matmuls (same weights, same rows) and against reading those weights once: what the
matmul kernels leave of the floor, and what the rest of the forward (norms, rotary, attention, the
LM head's float32 logits) costs on top.

    python benchmarks/small_matmul.py            # prints the tables, writes benchmarks/results/small_matmul.json
"""

from __future__ import annotations

import argparse
import json
import os
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

from tradojax.models.transformer import KVCache, init_model, per_layer_view  # noqa: E402
from tradojax.sampling.block_diffusion import CPU_SMALL_DECODE_OPTIONS  # noqa: E402

# XLA's defaults, and the options the sampler compiles small CPU decodes with
OPTION_SETS = {"": {}, " [ynn off]": dict(CPU_SMALL_DECODE_OPTIONS)}

SHAPES = {"lm_head": (768, 32000), "mlp_up": (768, 3072), "mlp_down": (3072, 768)}


def _best_ms(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4, help="rows per matmul (the sampler's block size)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; each case's best of 10 per round")
    parser.add_argument("--out", default="benchmarks/results/small_matmul.json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    read = jax.jit(jnp.sum)
    results = []
    for name, (k, n) in SHAPES.items():
        w_host = rng.normal(size=(k, n)).astype(np.float32)
        x_host = rng.normal(size=(args.rows, k)).astype(np.float32)
        w, wt, x = jnp.asarray(w_host), jnp.asarray(w_host.T.copy()), jnp.asarray(x_host)
        reference = x_host.astype(np.float64) @ w_host.astype(np.float64)
        cases = {"weight read (floor)": lambda: read(w), "numpy BLAS x @ w": lambda: x_host @ w_host}
        for label, options in OPTION_SETS.items():
            matmul = jax.jit(lambda x, w: x @ w, compiler_options=options)
            transposed = jax.jit(lambda x, wt: jnp.einsum("rk,nk->rn", x, wt), compiler_options=options)
            multiply_reduce = jax.jit(lambda x, w: jnp.sum(x[:, :, None] * w[None], axis=1), compiler_options=options)
            cases.update({f"xla x @ w{label}": lambda f=matmul: f(x, w),
                          f"xla x @ w.T (transposed){label}": lambda f=transposed: f(x, wt),
                          f"xla multiply-reduce{label}": lambda f=multiply_reduce: f(x, w)})
        for case in cases.values():  # compile, and check every product against float64
            out = np.asarray(case())
            if out.ndim == 2:
                np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-3)
        times = {case: [] for case in cases}
        for _ in range(args.repeats):
            for case, fn in cases.items():
                times[case].append(_best_ms(fn, 10))
        floor = statistics.median(times["weight read (floor)"])
        for case, each in times.items():
            ms = statistics.median(each)
            results.append({"matrix": name, "shape": [k, n], "rows": args.rows, "case": case, "ms": ms,
                            "gb_per_s": w_host.nbytes / ms / 1e6, "share_of_read_floor": floor / ms, "ms_each": each})
    print(f"{'matrix':>9} {'case':>37} {'ms':>7} {'GB/s':>6} {'share of read floor':>20}")
    for r in results:
        print(f"{r['matrix']:>9} {r['case']:>37} {r['ms']:>7.2f} {r['gb_per_s']:>6.1f} {r['share_of_read_floor']:>20.2f}")
    forward = model_forward(args.rows, args.repeats)
    print(f"\n125M model, one block of {args.rows} tokens (batch 1), weights {forward['weight_mb']:.0f} MB:")
    print(f"{'case':>37} {'ms':>7} {'share of read floor':>20}")
    for case, ms in forward["ms"].items():
        print(f"{case:>37} {ms:>7.2f} {forward['ms']['weight read (floor)'] / ms:>20.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python benchmarks/small_matmul.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "jax": jax.__version__, "backend": jax.default_backend(), "cpus": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_average": os.getloadavg(), "results": results,
        "model_forward": forward}, indent=2))
    print(f"\nwrote {out}")
    return 0


def model_forward(rows: int, repeats: int) -> dict:
    """The 125M benchmark model's batch-1 block forward (logits of `rows` tokens over a cache)
    against a chain of its matmuls and the read floor of its weights, under each option set."""
    from rollout import MODELS  # the sampler benchmark's 125M model

    config = MODELS["125m"]
    graphdef, params = nnx.split(init_model(config, seed=0))
    params = jax.jit(per_layer_view)(params)
    key = iter(jax.random.split(jax.random.key(1), 4))
    empty = KVCache.zeros(config, 1, 196)
    cache = KVCache(jax.random.normal(next(key), empty.k.shape), jax.random.normal(next(key), empty.v.shape),
                    jnp.array([96], jnp.int32))
    tokens = jax.random.randint(next(key), (1, rows), 4, config.vocab_size)

    def forward(params, tokens, cache):
        logits, _ = nnx.merge(graphdef, params).decode_block(tokens, cache, commit=False)
        return logits

    def as_matrices(params) -> list[jax.Array]:  # every streamed matrix as [contracted, out]
        model = nnx.merge(graphdef, params)
        out = [model.lm_head[...]]
        for name, per_layer in model.layer_params().items():
            for w in per_layer:
                if w.ndim >= 2:  # (norm scales are vectors)
                    out.append(w.reshape(-1, w.shape[-1]) if name == "o_proj" else w.reshape(w.shape[0], -1))
        return out

    sizes = sorted({w.shape[0] for w in jax.eval_shape(as_matrices, params)})
    inputs = {k: jax.random.normal(jax.random.key(k), (rows, k)) for k in sizes}  # a random input per width

    def matmuls(params, inputs):
        return sum(jnp.sum(inputs[w.shape[0]] @ w) for w in as_matrices(params))

    streamed = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                if "embed_tokens" not in jax.tree_util.keystr(path)]
    read = jax.jit(lambda ws: sum(jnp.sum(w) for w in ws))
    cases = {"weight read (floor)": lambda: read(streamed)}
    for label, options in OPTION_SETS.items():
        run_forward = jax.jit(forward, compiler_options=options)
        run_matmuls = jax.jit(matmuls, compiler_options=options)
        cases[f"block forward with logits{label}"] = lambda f=run_forward: f(params, tokens, cache)
        cases[f"its matmuls alone{label}"] = lambda f=run_matmuls: f(params, inputs)
    for case in cases.values():
        jax.block_until_ready(case())  # compile
    times = {case: [] for case in cases}
    for _ in range(repeats):
        for case, fn in cases.items():
            times[case].append(_best_ms(fn, 5))
    return {"weight_mb": sum(w.nbytes for w in streamed) / 1e6,
            "ms": {case: statistics.median(each) for case, each in times.items()}, "ms_each": times}


if __name__ == "__main__":
    sys.exit(main())

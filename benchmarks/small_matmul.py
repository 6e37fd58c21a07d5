"""What bounds a batch-1 decode forward on this backend: a block's few rows times one weight matrix.

A batch-1 forward of the block-diffusion sampler multiplies `block` (4) rows by every weight matrix.
Its ideal cost is reading each weight once; this script measures, side by side with interleaved
repeats, how close the available kernels come to that for the 125M benchmark model's largest
matrices (float32): the weight-read floor (a jitted sum over the matrix) against XLA's matmul, XLA's
matmul on the transposed weight, a multiply-reduce that XLA fuses, and numpy's BLAS.

    python benchmarks/small_matmul.py            # prints the table, writes benchmarks/results/small_matmul.json
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

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
    matmul = jax.jit(lambda x, w: x @ w)
    transposed = jax.jit(lambda x, wt: jnp.einsum("rk,nk->rn", x, wt))
    multiply_reduce = jax.jit(lambda x, w: jnp.sum(x[:, :, None] * w[None], axis=1))
    results = []
    for name, (k, n) in SHAPES.items():
        w_host = rng.normal(size=(k, n)).astype(np.float32)
        x_host = rng.normal(size=(args.rows, k)).astype(np.float32)
        w, wt, x = jnp.asarray(w_host), jnp.asarray(w_host.T.copy()), jnp.asarray(x_host)
        reference = x_host.astype(np.float64) @ w_host.astype(np.float64)
        cases = {"weight read (floor)": lambda: read(w), "xla x @ w": lambda: matmul(x, w),
                 "xla x @ w.T (transposed)": lambda: transposed(x, wt),
                 "xla multiply-reduce": lambda: multiply_reduce(x, w), "numpy BLAS x @ w": lambda: x_host @ w_host}
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
    print(f"{'matrix':>9} {'case':>26} {'ms':>7} {'GB/s':>6} {'share of read floor':>20}")
    for r in results:
        print(f"{r['matrix']:>9} {r['case']:>26} {r['ms']:>7.2f} {r['gb_per_s']:>6.1f} {r['share_of_read_floor']:>20.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python benchmarks/small_matmul.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "jax": jax.__version__, "backend": jax.default_backend(), "cpus": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_average": os.getloadavg(), "results": results}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

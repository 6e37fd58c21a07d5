"""Attention kernels vs the XLA reference: time, bandwidth floor, correctness; or TPU AOT memory.

On a GPU or TPU (the default mode) it times, at TraDo-4B head shapes (32 query heads, 8 KV heads,
head_dim 128, bfloat16):
  * decode: one block of `--block` queries per sequence against a KV cache of each
    `--cache-lengths` (batch `--batch`), kernel vs `ops.attention` reference, against the HBM
    floor: K and V of every sequence's valid cache read once (plus q, the block's K/V, the output)
    at the device's peak bandwidth;
  * training: the `[prompt | clean | noisy]` layout (`--train-prompt`, `--train-response`,
    batch `--train-batch`), forward and forward+backward, kernel vs reference, with the useful
    attention FLOPs (visible pairs only) per second;
and checks each kernel output (and gradient) against the reference computed in float32, first on a
sweep of small ragged shapes (head_dim 64/128, GQA 1/4/8, blocks 4-32, f32 and bf16), which also
shows that every kernel variant compiles there.

On a CPU host, `--tpu-compile v5e:2x2,v5p:2x2x1` compiles the TPU kernels at the same shapes for
those topologies (libtpu; batch split over the chips) and reports per-chip memory from
`compiled.memory_analysis()`; `--smoke` runs tiny shapes in interpret mode (checks this script).

Prints a table and writes JSON (`--json`).

  python benchmarks/attention.py --json attention_gpu.json                  # on the GPU
  JAX_PLATFORMS=cpu python benchmarks/attention.py --tpu-compile v5e:2x2,v5p:2x2x1 --json tpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tradojax.ops import attention, masks  # noqa: E402
from tradojax.ops.masks import MaskRule, Segments  # noqa: E402
from tradojax.ops.pallas import decode, segment  # noqa: E402

# Peak HBM bandwidth, GB/s (public specs), matched against `device_kind`.
HBM_GBPS = {"H200": 4800, "H100 PCIe": 2000, "H100": 3350, "A100": 2039, "L4": 300,
            "TPU v5 lite": 819, "TPU v5e": 819, "TPU v5p": 2765, "TPU v5": 2765, "TPU v6": 1640, "TPU v4": 1200}
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def peak_bandwidth(device_kind: str, override: float | None) -> float | None:
    if override:
        return override
    for name, gbps in HBM_GBPS.items():  # ordered: "H100 PCIe" before "H100"
        if name.lower() in device_kind.lower():
            return float(gbps)
    return None


def time_call(fn, args, iters: int) -> float:
    """Median seconds of `iters` calls (after a compile + warm-up call)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def relative_error(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    if not np.isfinite(out).all():
        return float("inf")
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def decode_inputs(args, cache_length: int, dtype):
    rng = np.random.default_rng(cache_length)
    slots = -(-cache_length // 128) * 128 + 128  # room for the block, a multiple of 128
    # ragged lengths in [3/4, 1] x cache_length: the kernel reads only the valid part
    lengths = rng.integers(cache_length * 3 // 4, cache_length + 1, args.batch).astype(np.int32)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)  # noqa: E731
    q = normal(args.batch, args.block, args.heads, args.head_dim)
    k_cache = normal(args.batch, slots, args.kv_heads, args.head_dim)
    v_cache = normal(args.batch, slots, args.kv_heads, args.head_dim)
    k_block = normal(args.batch, args.block, args.kv_heads, args.head_dim)
    v_block = normal(args.batch, args.block, args.kv_heads, args.head_dim)
    return q, k_cache, v_cache, jnp.asarray(lengths), k_block, v_block


def decode_floor_bytes(args, lengths, itemsize: int) -> int:
    per_token_kv = 2 * args.kv_heads * args.head_dim * itemsize
    block_bytes = args.batch * args.block * (2 * args.heads + 2 * args.kv_heads) * args.head_dim * itemsize
    return int(np.sum(np.asarray(lengths)) * per_token_kv + block_bytes)


def training_inputs(args, dtype):
    rng = np.random.default_rng(0)
    l0, l1, batch = args.train_prompt, args.train_response, args.train_batch
    prompt_lengths = rng.integers(l0 // 2, l0 + 1, batch)
    prompt_valid = np.arange(l0)[None, :] >= (l0 - prompt_lengths)[:, None]
    block, kind, valid, _ = masks.training_segments(prompt_valid, l1, args.block)
    segments = Segments(jnp.asarray(block), jnp.asarray(kind), jnp.asarray(valid))
    length = l0 + 2 * l1
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)  # noqa: E731
    q = normal(batch, length, args.heads, args.head_dim)
    k = normal(batch, length, args.kv_heads, args.head_dim)
    v = normal(batch, length, args.kv_heads, args.head_dim)
    return q, k, v, segments


def visible_pairs(segments: Segments) -> int:
    mask = masks.dense_mask(MaskRule.BLOCK_DIFFUSION, segments, segments, self_attention=True)
    return int(jnp.sum(mask))


# ----------------------------------------------------------------------------------------------
# Device benchmark
# ----------------------------------------------------------------------------------------------


def run_device(args) -> list[dict]:
    device = jax.devices()[0]
    platform = device.platform
    interpret = platform not in ("tpu", "gpu")
    variant = "tpu" if platform in ("tpu", "cpu") else "triton"
    dtype = DTYPES[args.dtype]
    itemsize = jnp.dtype(dtype).itemsize
    gbps = peak_bandwidth(device.device_kind, args.hbm_gbps)
    # the float32 references at full precision (bfloat16 inputs are unaffected; the kernels set theirs)
    jax.config.update("jax_default_matmul_precision", "highest")
    rows: list[dict] = []
    print(f"device: {device.device_kind} ({platform}), kernels: {variant}{' (interpret)' if interpret else ''}, "
          f"peak HBM {gbps or '?'} GB/s, dtype {args.dtype}")
    if not args.no_sweep:
        rows += _guarded("check", lambda: run_sweep(variant, interpret))
    rows += _guarded("decode", lambda: run_decode(args, device, variant, interpret, dtype, itemsize, gbps))
    if args.train_batch > 0:
        rows += _guarded("train", lambda: run_training(args, device, variant, interpret, dtype))
    return rows


def _guarded(section: str, fn) -> list[dict]:
    """Runs one section; a failure becomes a row (the other sections still run)."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - reported, not hidden
        import traceback

        traceback.print_exc()
        return [dict(kind=section, error=f"{type(err).__name__}: {err}"[:2000])]


def run_decode(args, device, variant, interpret, dtype, itemsize, gbps) -> list[dict]:
    rows = []

    kernel = jax.jit(lambda *a: decode.decode_attention(*a, backend=variant, interpret=interpret))
    reference = jax.jit(lambda *a: attention.cached_block_attention(*a, impl="reference"))
    reference_f32 = jax.jit(lambda *a: attention.cached_block_attention(
        *[x.astype(jnp.float32) if x.dtype == dtype else x for x in a], impl="reference"))
    for cache_length in args.cache_lengths:
        inputs = decode_inputs(args, cache_length, dtype)
        error = relative_error(kernel(*inputs), reference_f32(*inputs))
        t_kernel = time_call(kernel, inputs, args.iters)
        t_reference = time_call(reference, inputs, args.iters)
        floor_bytes = decode_floor_bytes(args, inputs[3], itemsize)
        t_floor = floor_bytes / (gbps * 1e9) if gbps else None
        rows.append(dict(
            kind="decode", device=device.device_kind, variant=variant, dtype=args.dtype, batch=args.batch,
            block=args.block, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
            cache_length=cache_length, mean_valid_length=float(np.mean(np.asarray(inputs[3]))),
            slots=int(inputs[1].shape[1]), kernel_us=t_kernel * 1e6, reference_us=t_reference * 1e6,
            floor_us=None if t_floor is None else t_floor * 1e6, floor_bytes=floor_bytes,
            achieved_gbps=floor_bytes / t_kernel / 1e9,
            fraction_of_floor=None if t_floor is None else t_floor / t_kernel,
            speedup_vs_reference=t_reference / t_kernel, max_rel_error=error))

    return rows


def run_training(args, device, variant, interpret, dtype) -> list[dict]:
    rows = []
    q, k, v, segments = training_inputs(args, dtype)
    rule = MaskRule.BLOCK_DIFFUSION

    def kernel_fwd(q, k, v, segments):
        out = segment.flash_attention(q, k, v, rule, segments, backend=variant, interpret=interpret)
        fallback = masks.self_only(rule, segments)
        return jnp.where(fallback[:, :, None, None], jnp.repeat(v, q.shape[2] // v.shape[2], axis=2), out)

    def reference_fwd(q, k, v, segments):
        return attention.segment_attention(q, k, v, rule, segments, impl="reference")

    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape, np.float32)).astype(dtype)

    def grads(fwd):
        def loss(q, k, v, segments):
            return jnp.sum(fwd(q, k, v, segments).astype(jnp.float32) * cotangent.astype(jnp.float32))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref32 = jax.jit(lambda q, k, v, s: reference_fwd(f32(q), f32(k), f32(v), s))
    fwd_error = relative_error(jax.jit(kernel_fwd)(q, k, v, segments), ref32(q, k, v, segments))
    ours_g = grads(kernel_fwd)(q, k, v, segments)
    ref_g = grads(lambda q, k, v, s: reference_fwd(f32(q), f32(k), f32(v), s))(q, k, v, segments)
    grad_error = max(relative_error(a, b) for a, b in zip(ours_g, ref_g))
    pairs = visible_pairs(segments) * args.heads
    length = q.shape[1]
    for name, ours, ref, flops in (
        ("train-fwd", jax.jit(kernel_fwd), jax.jit(reference_fwd), 4 * pairs * args.head_dim),
        ("train-fwd+bwd", grads(kernel_fwd), grads(reference_fwd), 14 * pairs * args.head_dim),
    ):
        t_kernel = time_call(ours, (q, k, v, segments), args.iters)
        t_reference = time_call(ref, (q, k, v, segments), args.iters)
        rows.append(dict(
            kind=name, device=device.device_kind, variant=variant, dtype=args.dtype,
            batch=args.train_batch, block=args.block, heads=args.heads, kv_heads=args.kv_heads,
            head_dim=args.head_dim, length=length, visible_fraction=pairs / (args.heads * args.train_batch * length**2),
            kernel_us=t_kernel * 1e6, reference_us=t_reference * 1e6,
            kernel_tflops=flops / t_kernel / 1e12, speedup_vs_reference=t_reference / t_kernel,
            max_rel_error=fwd_error if name == "train-fwd" else grad_error))
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# (head_dim, query groups, diffusion block, dtype) for the compiled-kernel correctness sweep
SWEEP = [(64, 1, 4, "float32"), (128, 4, 8, "bfloat16"), (64, 8, 16, "bfloat16"), (128, 1, 32, "float32"),
         (128, 4, 4, "bfloat16"), (64, 4, 32, "bfloat16")]
SWEEP_BOUND = {"float32": 5e-3, "bfloat16": 2e-2}  # f32 loose: a GPU may multiply f32 as tf32


def run_sweep(variant: str, interpret: bool) -> list[dict]:
    """Compiled kernels vs the float32 reference on small ragged shapes (compile coverage)."""
    rows = []
    for dim, groups, block, dtype_name in SWEEP:
        dtype = DTYPES[dtype_name]
        rng = np.random.default_rng(dim + groups + block)
        normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)  # noqa: E731
        f32 = lambda xs: [x.astype(jnp.float32) if x.dtype == dtype else x for x in xs]  # noqa: E731
        kv_heads, slots = 2, 320
        lengths = jnp.asarray([0, 1, 100, 257, 320 - block], jnp.int32)
        inputs = (normal(5, block, kv_heads * groups, dim), normal(5, slots, kv_heads, dim),
                  normal(5, slots, kv_heads, dim), lengths, normal(5, block, kv_heads, dim),
                  normal(5, block, kv_heads, dim))
        out = jax.jit(lambda *a: decode.decode_attention(*a, backend=variant, interpret=interpret))(*inputs)
        error = relative_error(out, attention.cached_block_attention(*f32(inputs)))
        rows.append(dict(kind="check-decode", variant=variant, dtype=dtype_name, head_dim=dim, groups=groups,
                         block=block, max_rel_error=error, ok=error < SWEEP_BOUND[dtype_name]))

        prompt_valid = np.arange(21)[None, :] >= np.array([0, 20, 7])[:, None]
        ids, kind, valid, _ = masks.training_segments(prompt_valid, 40, block)
        segments = Segments(jnp.asarray(ids), jnp.asarray(kind), jnp.asarray(valid))
        q, k, v = normal(3, 101, kv_heads * groups, dim), normal(3, 101, kv_heads, dim), normal(3, 101, kv_heads, dim)
        cotangent = jnp.asarray(rng.standard_normal(q.shape, np.float32))

        def loss(fn, q, k, v, segments, cotangent):
            return jnp.sum(fn(q, k, v, segments).astype(jnp.float32) * cotangent)

        def kernel(q, k, v, segments):
            out = segment.flash_attention(q, k, v, MaskRule.BLOCK_DIFFUSION, segments, backend=variant,
                                          interpret=interpret)
            fallback = masks.self_only(MaskRule.BLOCK_DIFFUSION, segments)[:, :, None, None]
            return jnp.where(fallback, jnp.repeat(v, groups, axis=2), out)

        def ref(q, k, v, segments):
            return attention.segment_attention(q, k, v, MaskRule.BLOCK_DIFFUSION, segments, impl="reference")

        ours = jax.jit(jax.value_and_grad(lambda *a: loss(kernel, *a), argnums=(0, 1, 2)))(
            q, k, v, segments, cotangent)
        theirs = jax.value_and_grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(*f32([q, k, v]), segments, cotangent)
        fwd_error = relative_error(jax.jit(kernel)(q, k, v, segments), ref(*f32([q, k, v]), segments))
        grad_error = max(relative_error(a, b) for a, b in zip(ours[1], theirs[1]))
        rows.append(dict(kind="check-train", variant=variant, dtype=dtype_name, head_dim=dim, groups=groups,
                         block=block, max_rel_error=max(fwd_error, grad_error),
                         ok=max(fwd_error, grad_error) < 1.5 * SWEEP_BOUND[dtype_name]))
    return rows


def print_device_table(rows: list[dict]) -> None:
    for r in rows:
        if "error" in r:
            print(f"FAILED {r['kind']}: {r['error']}")
        elif r["kind"].startswith("check"):
            print(f"{r['kind']:<13} {r['variant']:<7}{r['dtype']:<9} head_dim {r['head_dim']:>3} groups {r['groups']} "
                  f"block {r['block']:>2}: rel err {r['max_rel_error']:.1e} {'ok' if r['ok'] else 'TOO LARGE'}")
    rows = [r for r in rows if "error" not in r and not r["kind"].startswith("check")]
    print(f"\n{'kind':<14}{'length':>8}{'kernel us':>12}{'ref us':>12}{'floor us':>10}{'of floor':>9}"
          f"{'GB/s':>8}{'TFLOP/s':>9}{'speedup':>9}{'rel err':>10}")
    for r in rows:
        length = r.get("cache_length", r.get("length"))
        print(f"{r['kind']:<14}{length:>8}{r['kernel_us']:>12.1f}{r['reference_us']:>12.1f}"
              f"{_fmt(r.get('floor_us'), '.1f'):>10}{_fmt(r.get('fraction_of_floor'), '.0%'):>9}"
              f"{_fmt(r.get('achieved_gbps'), '.0f'):>8}{_fmt(r.get('kernel_tflops'), '.1f'):>9}"
              f"{r['speedup_vs_reference']:>8.2f}x{r['max_rel_error']:>10.1e}")


# ----------------------------------------------------------------------------------------------
# TPU ahead-of-time compile (CPU host + libtpu)
# ----------------------------------------------------------------------------------------------


def run_tpu_compile(args) -> list[dict]:
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from tradojax.ops.pallas import dispatch

    dtype = DTYPES[args.dtype]
    rows = []
    for topology in args.tpu_compile:
        devices = topologies.get_topology_desc(
            platform="tpu", topology_name=topology, chip_config_name="default",
            chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
        mesh = Mesh(np.array(devices), ("data",))
        chips = len(devices)

        def sds(shape, dt=dtype):
            spec = P("data", *([None] * (len(shape) - 1)))
            return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec))

        steps = []
        for cache_length in args.cache_lengths:
            slots = -(-cache_length // 128) * 128 + 128
            q = sds((args.batch, args.block, args.heads, args.head_dim))
            cache = sds((args.batch, slots, args.kv_heads, args.head_dim))
            block = sds((args.batch, args.block, args.kv_heads, args.head_dim))
            lengths = sds((args.batch,), jnp.int32)
            fn = lambda *a: dispatch.cached_block_attention(*a)  # noqa: E731
            steps.append(("decode", dict(cache_length=cache_length, batch=args.batch), fn,
                          (q, cache, cache, lengths, block, block)))
        if args.train_batch > 0:
            length = args.train_prompt + 2 * args.train_response
            batch = max(args.train_batch, chips)
            q = sds((batch, length, args.heads, args.head_dim))
            kv = sds((batch, length, args.kv_heads, args.head_dim))
            segs = Segments(sds((batch, length), jnp.int32), sds((batch, length), jnp.int32),
                            sds((batch, length), jnp.bool_))

            def train(q, k, v, segs):
                def loss(q, k, v):
                    out = dispatch.segment_attention(q, k, v, MaskRule.BLOCK_DIFFUSION, segs)
                    return jnp.sum(out.astype(jnp.float32))
                return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

            steps.append(("train-fwd+bwd", dict(length=length, batch=batch), train, (q, kv, kv, segs)))
        for kind, shape, fn, abstract in steps:
            start = time.perf_counter()
            compiled = jax.jit(fn).lower(*abstract).compile()
            seconds = time.perf_counter() - start
            memory = compiled.memory_analysis()
            text = compiled.as_text()
            rows.append(dict(
                kind=kind, topology=topology, chips=chips, dtype=args.dtype, heads=args.heads,
                kv_heads=args.kv_heads, head_dim=args.head_dim, block=args.block, **shape,
                mosaic_kernels=text.count("tpu_custom_call"), compile_s=seconds,
                argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
                temp_bytes=int(memory.temp_size_in_bytes), code_bytes=int(memory.generated_code_size_in_bytes)))
    return rows


def print_tpu_table(rows: list[dict]) -> None:
    mib = lambda n: n / 2**20  # noqa: E731
    print(f"\n{'topology':<11}{'kind':<15}{'batch':>6}{'length':>8}{'kernels':>8}{'args MiB':>10}"
          f"{'out MiB':>9}{'temp MiB':>10}{'compile s':>10}   (per chip)")
    for r in rows:
        length = r.get("cache_length", r.get("length"))
        print(f"{r['topology']:<11}{r['kind']:<15}{r['batch']:>6}{length:>8}{r['mosaic_kernels']:>8}"
              f"{mib(r['argument_bytes']):>10.1f}{mib(r['output_bytes']):>9.1f}{mib(r['temp_bytes']):>10.1f}"
              f"{r['compile_s']:>10.1f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser.add_argument("--batch", type=int, default=64, help="decode sequences")
    parser.add_argument("--block", type=int, default=4, help="diffusion block size")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--cache-lengths", type=ints, default=[1024, 2048, 4096])
    parser.add_argument("--train-batch", type=int, default=4, help="0 skips the training benchmark")
    parser.add_argument("--train-prompt", type=int, default=512)
    parser.add_argument("--train-response", type=int, default=1024)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--hbm-gbps", type=float, default=None, help="peak HBM bandwidth (default: by device kind)")
    parser.add_argument("--tpu-compile", type=lambda t: [x for x in t.split(",") if x], default=None,
                        help="comma-separated TPU topologies to compile for (CPU host with libtpu)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (interpret mode on CPU)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the small-shape correctness sweep")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.heads, args.kv_heads, args.head_dim = 2, 4, 2, 64
        args.cache_lengths, args.train_batch, args.train_prompt, args.train_response = [40, 100], 2, 12, 16
        args.iters = 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tpu_compile:
        rows = run_tpu_compile(args)
        print_tpu_table(rows)
    else:
        if jax.default_backend() == "cpu" and not args.smoke:
            print("no accelerator: use --tpu-compile TOPOLOGIES (AOT memory) or --smoke (interpret mode)")
            return 2
        rows = run_device(args)
        print_device_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

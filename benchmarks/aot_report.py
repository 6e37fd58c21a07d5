"""Which TPU slice do TraDo-4B and TraDo-8B TraceRL fit on? Compiles the rollout and the policy
update with the real TPU compiler on this host (`tradojax aot`, needs libtpu) for a list of
slices and meshes, prints a table and writes JSON.

  python benchmarks/aot_report.py                       # every case (about an hour on 2 cores)
  python benchmarks/aot_report.py --only 4b-v5p --out aot_4b.json
  python benchmarks/aot_report.py --list                # the cases and their exact commands

Shapes are the original's (spec 3.11): prompts of 784 tokens (bucket 784), 2000 new tokens,
64 rollout sequences per model replica (a replica is one `tensor` group: `data * fsdp` of them),
and one training row per data-parallel chip per micro-step (the original's batch_size_lm 1).

Precision: the rollout runs a bfloat16 copy of the weights; the update keeps float32 master
weights (`model.param_dtype=float32`, bfloat16 compute) with float32 AdamW moments, as bf16
mixed precision needs: a 1e-6 AdamW step on bfloat16 weights rounds to nothing.

Each case runs in its own process (one compile at a time; a compile that runs out of HBM is
reported as not fitting).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT_LENGTH, RESPONSE_LENGTH, SEQUENCES_PER_REPLICA, ROWS_PER_CHIP = 784, 2000, 64, 1
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    config: str
    topology: str
    mesh: tuple[int, int, int]  # data, fsdp, tensor
    sequences_per_replica: int = SEQUENCES_PER_REPLICA
    rows_per_chip: int = ROWS_PER_CHIP

    @property
    def chips(self) -> int:
        dims = self.topology.split(":")[1].split("x")
        count = 1
        for d in dims:
            count *= int(d)
        return count

    def commands(self) -> dict[str, list[str]]:
        """One `tradojax aot` command per step (they differ in the weights' dtype)."""
        data, fsdp, tensor = self.mesh
        replicas = data * fsdp
        common = ["--config=" + self.config, f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
                  f"--config.mesh.tensor={tensor}", "--topology", self.topology,
                  "--prompt-length", str(PROMPT_LENGTH), "--response-length", str(RESPONSE_LENGTH)]
        rows = self.rows_per_chip * replicas
        return {
            "rollout": ["tradojax", "aot", *common, "--config.model.param_dtype=bfloat16", "--steps", "rollout",
                        "--batch", str(self.sequences_per_replica * replicas)],
            "update": ["tradojax", "aot", *common, "--config.model.param_dtype=float32",
                       f"--config.train.micro_batch_size={rows}", "--steps", "update", "--rows", str(rows)],
        }


CASES = [
    Case("4b-v5p-2x2x1", "configs/rl_trado_4b.py", "v5p:2x2x1", (1, 4, 1)),
    Case("4b-v6e-2x2-fsdp", "configs/rl_trado_4b.py", "v6e:2x2", (1, 4, 1)),
    Case("4b-v6e-2x2-tp2", "configs/rl_trado_4b.py", "v6e:2x2", (1, 2, 2)),
    Case("4b-v5e-2x2", "configs/rl_trado_4b.py", "v5e:2x2", (1, 1, 4)),
    Case("4b-v5e-2x4", "configs/rl_trado_4b.py", "v5e:2x4", (1, 2, 4)),
    Case("8b-v5p-2x2x1", "configs/rl_trado_8b.py", "v5p:2x2x1", (1, 4, 1)),
    Case("8b-v6e-2x2", "configs/rl_trado_8b.py", "v6e:2x2", (1, 2, 2)),
    Case("8b-v6e-2x4", "configs/rl_trado_8b.py", "v6e:2x4", (1, 4, 2)),
    Case("8b-v5e-2x4", "configs/rl_trado_8b.py", "v5e:2x4", (1, 2, 4)),
    Case("8b-v5e-4x4", "configs/rl_trado_8b.py", "v5e:4x4", (1, 4, 4)),
    # headroom on the smallest v5p slice: 4 rows per chip per micro-step, 128 sequences per replica
    Case("4b-v5p-2x2x1-large", "configs/rl_trado_4b.py", "v5p:2x2x1", (1, 4, 1), 128, 4),
    Case("8b-v5p-2x2x1-large", "configs/rl_trado_8b.py", "v5p:2x2x1", (1, 4, 1), 128, 4),
]


def run_case(case: Case, timeout_s: int) -> list[dict]:
    rows = []
    for step, command in case.commands().items():
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "aot.json"
            argv = [sys.executable, "-m", "tradojax.cli", *command[1:], "--json", str(out)]
            start = time.perf_counter()
            try:
                done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
                                      env=dict(os.environ, JAX_PLATFORMS="cpu"))
                failure = "" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1]
            except subprocess.TimeoutExpired:
                failure = f"timed out after {timeout_s} s"
            elapsed = time.perf_counter() - start
            results = json.loads(out.read_text()) if out.exists() and not failure else []
        if failure:
            results = [{"step": step, "fits": False, "error": failure, "peak_bytes": 0, "flops_per_chip": 0.0,
                        "compile_s": elapsed}]
        for r in results:
            r.update(case=case.name, config=case.config, topology=case.topology, chips=case.chips,
                     mesh_axes=dict(zip(("data", "fsdp", "tensor"), case.mesh)),
                     command=" ".join(shlex.quote(a) for a in command))
            rows.append(r)
    return rows


def _required_from_error(message: str) -> int:
    from tradojax.parallel.aot import oom_required_bytes

    return oom_required_bytes(message)


def print_table(rows: list[dict]) -> None:
    header = (f"| case | slice (chips) | mesh d,f,t | program | shapes | peak GiB/chip | HBM % | fits | "
              f"TFLOP/chip | compile s |")
    print(header)
    print("|---|---|---|---|---|---:|---:|---|---:|---:|")
    for r in rows:
        hbm = HBM_GIB[r["topology"].split(":")[0]]
        if r["step"].startswith("rollout"):
            shapes = (f"{r.get('sequences', '?')} seqs, "
                      f"{r.get('prompt_length', '?')}+{r.get('response_length', '?')} slots")
        elif r["step"] == "update":
            shapes = f"{r.get('rows', '?')} rows x {r.get('prompt_length', 0) + 2 * r.get('response_length', 0)}"
        else:
            shapes = ""
        peak = r["peak_bytes"] / 2**30
        mesh = ",".join(str(v) for v in r["mesh_axes"].values())
        required = r.get("required_bytes") or _required_from_error(r.get("error", ""))
        if r["fits"]:
            note = "yes"
        elif required:
            note = f"NO (needs {required / 2**30:.1f} GiB)"
        else:
            note = "NO" + (f": {r['error'][:60]}" if r.get("error") else "")
        peak_text, percent = (f"{peak:.2f}", f"{100 * peak / hbm:.0f}") if not r.get("error") else ("-", "-")
        print(f"| {r['case']} | {r['topology']} ({r['chips']}) | {mesh} | {r['step']} | {shapes} | "
              f"{peak_text} | {percent} | {note} | {r['flops_per_chip'] / 1e12:.2f} | {r['compile_s']:.0f} |")


def summary(rows: list[dict]) -> None:
    """The smallest slice per (model, generation) where every program fits."""
    verdict: dict[tuple[str, str, str], bool] = {}
    chips: dict[tuple[str, str, str], int] = {}
    for r in rows:
        key = (r["config"], r["topology"].split(":")[0], r["case"])
        verdict[key] = verdict.get(key, True) and bool(r["fits"])
        chips[key] = r["chips"]
    print("\nsmallest fitting slice (rollout + update):")
    for config in sorted({k[0] for k in verdict}):
        for generation in sorted({k[1] for k in verdict if k[0] == config}):
            fitting = [k for k in verdict if k[0] == config and k[1] == generation and verdict[k]]
            if fitting:
                best = min(fitting, key=lambda k: chips[k])
                print(f"  {config} on {generation}: {best[2]} ({chips[best]} chips)")
            else:
                print(f"  {config} on {generation}: none of the tried slices")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated case-name prefixes (default: all)")
    parser.add_argument("--out", default="aot_report.json", help="JSON output")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per compile command")
    parser.add_argument("--list", action="store_true", help="print the cases' commands and exit")
    parser.add_argument("--from-json", nargs="+", metavar="FILE", help="print the table of saved results and exit")
    args = parser.parse_args(argv)
    if args.from_json:
        rows = [row for path in args.from_json for row in json.loads(Path(path).read_text())]
        print_table(rows)
        summary(rows)
        return 0
    prefixes = [p for p in args.only.split(",") if p]
    cases = [c for c in CASES if not prefixes or any(c.name.startswith(p) for p in prefixes)]
    if not cases:
        parser.error(f"--only {args.only!r} matches no case (known: {', '.join(c.name for c in CASES)})")
    if args.list:
        for case in cases:
            for step, command in case.commands().items():
                print(f"{case.name} {step}: {' '.join(shlex.quote(a) for a in command)}")
        return 0
    rows: list[dict] = []
    for case in cases:
        print(f"compiling {case.name} ...", file=sys.stderr, flush=True)
        rows.extend(run_case(case, args.timeout))
        Path(args.out).write_text(json.dumps(rows, indent=2))  # partial results survive an interruption
    print_table(rows)
    summary(rows)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

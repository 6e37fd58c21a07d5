"""Does every shipped config fit where it says? Compiles, with the real TPU compiler on this host
(`tradojax aot`, needs libtpu), every program of each config's run on each slice its `mesh.slices`
names, at full size, and prints the README's table (per chip: the largest total of each group of
programs, with what the run holds beside it).

  python benchmarks/aot_report.py                                 # every case (hours on 2 cores)
  python benchmarks/aot_report.py --only rl_trado_4b --out x.json # cases whose name starts so
  python benchmarks/aot_report.py --list                          # the cases and their exact commands
  python benchmarks/aot_report.py --from-json benchmarks/results/aot_report.json   # the table again

Each (config, slice) runs in its own process, one after another (a full-size 4B update takes
about ten minutes to compile on 2 busy cores); results are written after every case, so an
interrupted report keeps them. A compile that runs out of HBM is reported as not fitting.

The RL cases compile the rollout and learner programs; the eval sweep's sampler programs (the
same functions on `eval.chunk_tasks x eval.num_samples` rows, fewer than a rollout's, with the
same `max_active`) are compiled at full size by the eval configs' cases and, for every config, by
`tests/test_aot.py` at 2 layers. `rl_sdar_code` runs the programs of `rl_trado_4b` (only its
rewards differ; the test checks that they lower to the same text).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tradojax.aot import HBM_GIB, oom_required_bytes  # noqa: E402
from tradojax.config import load_config  # noqa: E402

# in the order the report runs them: the RL configs' first slices first
SHIPPED = ["rl_trado_4b", "rl_trado_8b", "rl_trado_8b_thinking", "rl_trado_4b_value", "trado_4b", "trado_8b",
           "rl_llada_8b", "rl_dream_7b", "rl_dream_coder_7b"]
RL_PROGRAMS = "rollout,old_logprobs,ref_logprobs,policy_update,old_values,value_update"
# beyond each config's own settings: what its docstring suggests for v5p (faster rollouts) and v5e
VARIANTS = {
    "rl_trado_4b+max_active128": ("rl_trado_4b", "v5p:2x2x1", ["--config.sampling.max_active=128"]),
    "rl_trado_8b+dp4": ("rl_trado_8b", "v5p:2x2x1", ["--config.mesh.fsdp=4", "--config.mesh.tensor=1",
                                                     "--config.sampling.max_active=64"]),
    "rl_trado_4b+v5e": ("rl_trado_4b", "v5e:2x4", ["--config.sampling.max_active=8"]),
    "rl_trado_8b+v5e": ("rl_trado_8b", "v5e:4x4", ["--config.sampling.max_active=4"]),
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    config: str  # a file stem under configs/
    topology: str
    overrides: tuple[str, ...] = ()
    programs: str = ""  # program-name prefixes (default: RL_PROGRAMS for RL configs, all for eval configs)

    def command(self) -> list[str]:
        programs = self.programs or (RL_PROGRAMS if self.config.startswith("rl_") else "")
        only = ["--programs", programs] if programs else []
        return ["tradojax", "aot", f"--config=configs/{self.config}.py", *self.overrides, "--topology", self.topology,
                *only]


def cases() -> list[Case]:
    slices = {stem: load_config(REPO / "configs" / f"{stem}.py").mesh.slices for stem in SHIPPED}
    found = [Case(f"{stem}@{topology}", stem, topology) for depth in range(max(map(len, slices.values())))
             for stem in SHIPPED if depth < len(slices[stem]) for topology in [slices[stem][depth]]]
    for name, (stem, topology, overrides) in VARIANTS.items():
        found.append(Case(f"{name}@{topology}", stem, topology, tuple(overrides)))
    return found


def run_case(case: Case, timeout_s: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "aot.json"
        argv = [sys.executable, "-m", "tradojax.cli", *case.command()[1:], "--json", str(out)]
        start = time.perf_counter()
        try:
            done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
                                  env=dict(os.environ, JAX_PLATFORMS="cpu"))
            # exit 1: compiled, something does not fit (the JSON says what); anything else failed
            errors = [line for line in done.stderr.splitlines() if re.match(r"^\w+(Error|Exception)\b", line)]
            failure = "" if done.returncode in (0, 1) and out.exists() else (
                errors or done.stderr.strip().splitlines() or ["?"])[-1]
        except subprocess.TimeoutExpired:
            failure = f"timed out after {timeout_s} s"
        elapsed = time.perf_counter() - start
        rows = json.loads(out.read_text()) if not failure else [
            {"program": "(all)", "fits": False, "error": failure, "total_bytes": 0, "compile_s": elapsed,
             "topology": case.topology, "mesh": {}, "chips": 0}]
    for row in rows:
        row.update(case=case.name, config_stem=case.config, overrides=list(case.overrides),
                   command=" ".join(shlex.quote(a) for a in case.command()))
    return rows


def group_of(program: str) -> str:
    if program.startswith("rollout/"):
        return "rollout"
    if program.startswith("eval/"):
        return "eval"
    return "update" if program.endswith("update") else "forward"


def print_table(rows: list[dict]) -> None:
    """One line per case: the largest per-chip total (program + what the run holds beside it) of
    each group of programs: rollout (start/refill/decode/outputs), forward (old log-probs, old
    values), update (policy and value updates), eval (the eval sweep's sampler)."""
    groups = ("rollout", "forward", "update", "eval")
    print("| config | slice (chips) | mesh d,f,t | " + " | ".join(f"{g} GiB" for g in groups) + " | fits |")
    print("|---|---|---|" + "---:|" * len(groups) + "---|")
    by_case: dict[str, list[dict]] = {}
    for r in rows:  # several passes over one case (e.g. --programs rollout, then the rest) merge
        by_case.setdefault(r["case"], []).append(r)
    for name, case_rows in by_case.items():
        first = case_rows[0]
        hbm = HBM_GIB[first["topology"].split(":")[0]]
        cells = []
        for g in groups:
            members = [r for r in case_rows if r["program"] != "(all)" and group_of(r["program"]) == g]
            if not members:
                cells.append("-")
                continue
            failed = [r for r in members if r.get("error")]
            if failed:
                needs = max(r.get("required_bytes") or oom_required_bytes(r["error"]) for r in failed)
                cells.append(f"needs {needs / 2**30:.1f}" if needs else "error")
            else:
                cells.append(f"{max(r['total_bytes'] for r in members) / 2**30:.1f}")
        mesh = ",".join(str(first.get("mesh", {}).get(a, "?")) for a in ("data", "fsdp", "tensor"))
        fits = all(r["fits"] for r in case_rows)
        label = first["config_stem"] + (" " + " ".join(o.removeprefix("--config.") for o in first["overrides"])
                                         if first["overrides"] else "")
        note = "yes" if fits else ("NO: " + first["error"][:60] if first["program"] == "(all)" else "NO")
        print(f"| {label} | {first['topology']} ({first.get('chips', '?')}) | {mesh} | " + " | ".join(cells)
              + f" | {note} (HBM {hbm}) |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated case-name prefixes (default: all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "aot_report.json"), help="JSON output")
    parser.add_argument("--timeout", type=int, default=5400, help="seconds per case")
    parser.add_argument("--programs", default="", help="program-name prefixes to compile in every case "
                                                       "(default: all of an eval config's, the rollout and learner "
                                                       "programs of an RL config's)")
    parser.add_argument("--list", action="store_true", help="print the cases' commands and exit")
    parser.add_argument("--from-json", nargs="+", metavar="FILE", help="print the table of saved results and exit")
    args = parser.parse_args(argv)
    if args.from_json:
        print_table([row for path in args.from_json for row in json.loads(Path(path).read_text())])
        return 0
    prefixes = [p for p in args.only.split(",") if p]
    chosen = [dataclasses.replace(c, programs=args.programs) for c in cases()
              if not prefixes or any(c.name.startswith(p) for p in prefixes)]
    if not chosen:
        parser.error(f"--only {args.only!r} matches no case (known: {', '.join(c.name for c in cases())})")
    if args.list:
        for case in chosen:
            print(f"{case.name}: {' '.join(shlex.quote(a) for a in case.command())}")
        return 0
    rows: list[dict] = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for case in chosen:
        print(f"compiling {case.name} ...", file=sys.stderr, flush=True)
        rows.extend(run_case(case, args.timeout))
        Path(args.out).write_text(json.dumps(rows, indent=2))  # partial results survive an interruption
    print_table(rows)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The demo's figures three ways: the README's quick-start table, the recorded run
(`benchmarks/results/demo.json`) and, if given, a fresh run's `summary.json`.

    tradojax demo && python benchmarks/demo_figures.py runs/demo     # compare a fresh run
    python benchmarks/demo_figures.py --record runs/demo             # record it (then update the README)

Prints one table and exits 1 when any two disagree, so "the README is true" is a command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "benchmarks" / "results" / "demo.json"
ROWS = {"accuracy": "held-out accuracy", "pass_at_k": "held-out pass@", "mean_length": "mean answer length"}


def readme_table(readme: Path = ROOT / "README.md") -> dict[str, list[float]]:
    """The quick-start table's (after SFT, after TraceRL) pairs, keyed like `demo_table`."""
    figures = {}
    for line in readme.read_text().splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if len(cells) != 3:
            continue
        for key, label in ROWS.items():
            if cells[0].startswith(label) and key not in figures:
                figures[key] = [float(cells[1]), float(cells[2])]
    missing = set(ROWS) - set(figures)
    if missing:
        raise SystemExit(f"{readme}: the quick-start table has no row for {sorted(missing)}")
    return figures


def differences(a: dict, b: dict, keys=tuple(ROWS)) -> list[str]:
    return [key for key in keys if a.get(key) != b.get(key)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", type=Path, help="a demo output directory (holding summary.json)")
    parser.add_argument("--record", action="store_true", help="write RUN's figures to benchmarks/results/demo.json")
    args = parser.parse_args(argv)
    fresh = json.loads((args.run / "summary.json").read_text()) if args.run else None
    if args.record:
        if fresh is None:
            parser.error("--record needs a RUN directory")
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        record = {"command": "tradojax demo", "date": datetime.date.today().isoformat(), "commit": commit, **fresh}
        RECORDED.write_text(json.dumps(record, indent=2) + "\n")
        print(f"recorded {args.run / 'summary.json'} -> {RECORDED}")
    recorded = json.loads(RECORDED.read_text())
    readme = readme_table()
    sources = {"README": readme, "recorded": recorded} | ({"fresh run": fresh} if fresh else {})
    print(f"{'figure':<22}" + "".join(f"{name:>22}" for name in sources))
    for key, label in ROWS.items():
        print(f"{label:<22}" + "".join(f"{' -> '.join(str(v) for v in src[key]):>22}" for src in sources.values()))
    disagree = differences(readme, recorded) + (differences(recorded, fresh) if fresh else [])
    if fresh and recorded.get("rollout_reward") != fresh.get("rollout_reward"):
        disagree.append("rollout_reward")
    if disagree:
        print(f"DISAGREE: {sorted(set(disagree))}")
        return 1
    print("all agree")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Imports point down: the README's layer map, checked on every import of every module under
tradojax/ (those inside functions too), so the claim stays true.

    config | checkpoint, metrics, parallel | data | rewards | bootstrap    beside the model code, none of it
    ops -> models -> sampling, training -> evaluation -> rl, sft -> commands

A module may import its own unit and any unit of a lower rank. Units of the same rank are siblings
and do not import each other (rl and sft: the SFT warm start before RL is wired by the `rl`
command). Commands (`cli.py`, `aot.py`, `demo.py`, every `*/commands.py`, and `data/prepare.py` for
`tradojax data`) may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tradojax"

# unit -> rank; a module's unit is the longest prefix of its dotted name listed here
RANKS: dict[str, int] = {
    "tradojax.config": 0,
    "tradojax.checkpoint": 1, "tradojax.metrics": 1, "tradojax.parallel": 1,
    "tradojax.data": 2,
    "tradojax.rewards": 3,
    "tradojax.bootstrap": 4,  # what every command does first; no model code
    "tradojax.ops": 10,
    "tradojax.models": 20,
    "tradojax.sampling": 30, "tradojax.training": 30,
    "tradojax.evaluation": 35,
    "tradojax.rl": 40, "tradojax.sft": 40,
    "tradojax.commands": 50,
}
COMMAND_MODULES = {"tradojax.cli", "tradojax.aot", "tradojax.demo", "tradojax.data.prepare"}
ROOT_MODULES = {"tradojax"}  # the package's own __init__ (a version string)


def unit_of(module: str) -> str:
    if module in COMMAND_MODULES or module.endswith(".commands"):
        return "tradojax.commands"
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in RANKS:
            return ".".join(parts[:end])
    raise KeyError(f"{module}: no layer; add its package to RANKS in tests/test_layers.py")


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The tradojax modules an import statement names: `from a import b` names module a.b where
    that is a module, else module a."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "tradojax"]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "tradojax":
        return []
    submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known]
    return submodules + ([target] if len(submodules) < len(node.names) else [])


def violations(package: Path = PACKAGE) -> list[str]:
    """`file:line -> module (unit rank -> unit rank)` for every import that points up or sideways."""
    found = []
    known = {module_name(p, package) for p in package.rglob("*.py")}
    for path in sorted(package.rglob("*.py")):
        module = module_name(path, package)
        if module in ROOT_MODULES:
            continue
        unit = unit_of(module)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in imported_modules(node, module, path.name == "__init__.py", known):
                if target in ROOT_MODULES:
                    continue
                other = unit_of(target)
                if other == unit or unit == "tradojax.commands" or RANKS[other] < RANKS[unit]:
                    continue
                way = "up" if RANKS[other] > RANKS[unit] else "sideways"
                found.append(f"{path.relative_to(package.parent)}:{node.lineno} -> {target} "
                             f"({way}: {unit} {RANKS[unit]} -> {other} {RANKS[other]})")
    return found


def test_imports_point_down():
    found = violations()
    assert not found, "imports against the layer order:\n" + "\n".join(found)


def test_every_module_has_a_layer():
    modules = [module_name(p, PACKAGE) for p in PACKAGE.rglob("*.py")]
    assert len(modules) > 50
    for module in modules:
        if module not in ROOT_MODULES:
            unit_of(module)


def test_the_check_sees_imports_inside_functions_and_relative_ones(tmp_path):
    package = tmp_path / "tradojax"
    files = {
        "__init__.py": "",
        "ops/__init__.py": "",
        "ops/masks.py": "def f():\n    from tradojax.models import transformer\n",  # up, inside a function
        "models/__init__.py": "",
        "models/transformer.py": "from ..ops import masks\nimport tradojax.config\n",  # down, relative: fine
        "config.py": "",
        "rl/__init__.py": "",
        "rl/loop.py": "from tradojax.sft.trainer import SFTTrainer\n",  # sideways
        "sft/__init__.py": "",
        "sft/trainer.py": "from . import warm\n",
        "sft/warm.py": "",
        "sft/commands.py": "from tradojax.rl import loop\n",  # a command: anything
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    found = violations(package)
    assert found == ["tradojax/ops/masks.py:2 -> tradojax.models.transformer (up: tradojax.ops 10 -> tradojax.models 20)",
                     "tradojax/rl/loop.py:1 -> tradojax.sft.trainer (sideways: tradojax.rl 40 -> tradojax.sft 40)"]


@pytest.mark.parametrize("module, unit", [("tradojax.models.commands", "tradojax.commands"),
                                          ("tradojax.parallel.axes", "tradojax.parallel"),
                                          ("tradojax.data.prepare", "tradojax.commands"),
                                          ("tradojax.sampling.block_diffusion", "tradojax.sampling")])
def test_units(module, unit):
    assert unit_of(module) == unit

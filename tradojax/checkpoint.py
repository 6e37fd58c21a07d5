"""Training checkpoints: named pytrees (params, optimizer states, ...) plus a JSON record.

One orbax `CheckpointManager` per run directory; each step is a folder holding one StandardSave
item per pytree and a JSON item (`meta`: step, data-iterator and rng state, config). Restores go
straight into the given abstract targets (with their shardings), so nothing is gathered on a host.
A save is atomic: a crash mid-save leaves the previous checkpoints intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written; the message names the directory."""


def _abstract(tree: Any) -> Any:
    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


class TrainCheckpointer:
    """Keeps the last `max_to_keep` steps of a run under `directory`."""

    def __init__(self, directory: str | Path, max_to_keep: int = 3):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, trees: dict[str, Any], meta: dict) -> None:
        items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
        items["meta"] = ocp.args.JsonSave(meta)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()

    def restore_meta(self, step: int | None = None) -> tuple[int, dict]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to resume from")
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as err:  # orbax raises many types for damaged items
            raise CheckpointError(f"{self.directory}/{step}/meta: cannot read: {err}") from None
        return step, meta

    def restore(self, step: int, targets: dict[str, Any]) -> dict[str, Any]:
        """Restores the named pytrees into the structure (and shardings) of `targets`."""
        items = {name: ocp.args.StandardRestore(_abstract(tree)) for name, tree in targets.items()}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:
            raise CheckpointError(f"{self.directory}/{step}: cannot restore {sorted(targets)}: {err}") from None
        return {name: restored[name] for name in targets}

    def close(self) -> None:
        self.manager.close()

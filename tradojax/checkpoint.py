"""Training checkpoints: named pytrees (params, optimizer states, ...) plus a JSON record.

One orbax `CheckpointManager` per run directory; each step is a folder holding one StandardSave
item per pytree, a JSON item (`meta`: step, data-iterator and rng state, config) and a JSON
`integrity` item (a fingerprint of every saved array). Restores go straight into the given
abstract targets (with their shardings), so nothing is gathered on a host.

A save is atomic (orbax writes into a temporary folder, marks it with `commit_success.txt` and
renames it): a crash mid-save leaves the previous checkpoints intact. What atomicity cannot
catch -- a file truncated or deleted later, a folder copied without its marker, flipped bits --
`restore_latest_good` detects: it walks the steps from the newest, skips each damaged one with a
message naming its folder, moves that folder aside (renamed `<step>.damaged-<time>`, never
deleted, so the step can be saved again) and restores the newest intact step.

`read_training_step` reads a run from outside its trainer (export-hf, sample, eval take a run
directory as a model): the same checks and skipping, without moving anything.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

COMMIT_MARKER = "commit_success.txt"  # orbax writes it last, into every finalized step folder
META_ITEM = "meta"
INTEGRITY_ITEM = "integrity"


# The trees to restore (name -> abstract pytree), or a function of the step's meta giving them.
Targets = dict[str, Any] | Callable[[dict], dict[str, Any]]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the directory or file."""


class Preempted(Exception):
    """SIGTERM (a preempted VM): the trainer finished its step, saved it, and stopped; resume continues."""


def _abstract(tree: Any) -> Any:
    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


# ----------------------------------------------------------------------------------------------
# Fingerprints: a position-weighted sum of the bit patterns of every array, computed on device
# ----------------------------------------------------------------------------------------------


# the unsigned type an element's bits are read as, by its byte size (8 bytes: two 32-bit words)
_WORD_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}


def _as_words(x: jax.Array) -> jax.Array:
    """The bit pattern of `x` as uint32 words (one per element for <= 4-byte dtypes)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = _WORD_OF_SIZE[jnp.dtype(x.dtype).itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _linear_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major element index (mod 2**32) built from iotas, so a sharded array is never reshaped."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride % 2**32)
        stride *= shape[dim]
    return index


@jax.jit
def _fingerprints(leaves: list[jax.Array]) -> list[jax.Array]:
    # word * (2 * index + 1), summed mod 2**32: any single flipped bit changes the sum (odd
    # multipliers are invertible mod 2**32), and so does moving a value to another position.
    out = []
    for leaf in leaves:
        words = _as_words(leaf)
        weights = _linear_index(words.shape) * jnp.uint32(2) + jnp.uint32(1)
        out.append(jnp.sum(words * weights, dtype=jnp.uint32))
    return out


def _host_fingerprint(leaf: jax.Array) -> int:
    """`_fingerprints` of one array in numpy: uint32 products and sums wrap mod 2**32 as on device."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    x = np.asarray(leaf)
    if x.dtype == np.bool_:
        words = x.astype(np.uint32).reshape(-1)
    else:  # an 8-byte element is two little-endian words, as XLA's bitcast to uint32 gives them
        words = np.ascontiguousarray(x).view(_WORD_OF_SIZE[x.dtype.itemsize]).astype(np.uint32).reshape(-1)
    weights = np.arange(words.size, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    return int(np.sum(words * weights, dtype=np.uint32))


def tree_fingerprints(tree: Any) -> dict[str, int]:
    """{leaf path: uint32 fingerprint} of every array in `tree`.

    Arrays on CPU devices are fingerprinted in numpy (the same values): no XLA program is compiled
    per saved tree structure, which on XLA:CPU is most of a small save's time. Accelerator arrays
    stay on device (sharded arrays are never gathered)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    paths = [jax.tree_util.keystr(path) for path, _ in flat]
    leaves = [jnp.asarray(leaf) for _, leaf in flat]
    if all(leaf.is_fully_addressable and {d.platform for d in leaf.sharding.device_set} == {"cpu"}
           for leaf in leaves):
        return {path: _host_fingerprint(leaf) for path, leaf in zip(paths, leaves)}
    # one compiled call per placement: a jitted computation takes arrays from one set of devices
    by_devices: dict[frozenset, list[int]] = {}
    for i, leaf in enumerate(leaves):
        by_devices.setdefault(frozenset(leaf.sharding.device_set), []).append(i)
    values = [0] * len(leaves)
    for indices in by_devices.values():
        for i, value in zip(indices, jax.device_get(_fingerprints([leaves[i] for i in indices]))):
            values[i] = int(value)
    return dict(zip(paths, values))


# ----------------------------------------------------------------------------------------------
# The checkpointer
# ----------------------------------------------------------------------------------------------


class TrainCheckpointer:
    """Keeps the last `max_to_keep` steps of a run under `directory`.

    With `create=False` the directory must exist (restoring from a run that is not there is a
    clear error rather than an empty new run). `log` receives messages about skipped checkpoints.
    """

    def __init__(self, directory: str | Path, max_to_keep: int = 3, *, create: bool = True,
                 log: Callable[[str], None] = print):
        text = str(directory)
        self.directory = epath.Path(text if "://" in text else Path(text).absolute())  # local or gs://
        self.log = log
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: is a file, not a checkpoint directory")
        if not self.directory.exists():
            if not create:
                raise CheckpointError(f"{self.directory}: checkpoint directory does not exist")
            self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest step orbax lists (it may still be damaged: see `restore_latest_good`)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_directory(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def save(self, step: int, trees: dict[str, Any], meta: dict) -> None:
        """Saves `trees` (name -> pytree) and the JSON-serialisable `meta` as `step`; blocks until written."""
        reserved = {META_ITEM, INTEGRITY_ITEM} & set(trees)
        if reserved:
            raise CheckpointError(f"{self.directory}: tree names {sorted(reserved)} are reserved")
        items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
        items[META_ITEM] = ocp.args.JsonSave(meta)
        items[INTEGRITY_ITEM] = ocp.args.JsonSave(
            {"format": 1, "fingerprints": {name: tree_fingerprints(tree) for name, tree in trees.items()}})
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
            self.manager.wait_until_finished()
        except ocp.checkpoint_manager.StepAlreadyExistsError:
            raise CheckpointError(f"{self.step_directory(step)}: a checkpoint for step {step} already exists") from None

    def restore_meta(self, step: int | None = None) -> tuple[int, dict]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to resume from")
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]
        except Exception as err:  # orbax raises many types for damaged items
            raise CheckpointError(f"{self.step_directory(step)}/{META_ITEM}: cannot read: {_first_line(err)}") from None
        return step, meta

    def restore(self, step: int, targets: dict[str, Any]) -> dict[str, Any]:
        """Restores the named pytrees into the structure (and shardings) of `targets`, checking
        their fingerprints when the checkpoint recorded them."""
        items = {name: ocp.args.StandardRestore(_abstract(tree)) for name, tree in targets.items()}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:
            raise CheckpointError(f"{self.step_directory(step)}: cannot restore {sorted(targets)}: "
                                  f"{_first_line(err)}") from None
        trees = {name: restored[name] for name in targets}
        recorded = self._recorded_fingerprints(step)
        for name, tree in trees.items():
            expected = recorded.get(name)
            if expected is None:
                continue
            actual = tree_fingerprints(tree)
            bad = [path for path in expected if actual.get(path) != expected[path]]
            if bad or set(actual) != set(expected):
                raise CheckpointError(f"{self.step_directory(step)}/{name}: data does not match the fingerprint "
                                      f"saved with it ({', '.join(bad[:3]) or 'different leaves'}): the files are "
                                      "damaged")
        return trees

    def _recorded_fingerprints(self, step: int) -> dict[str, dict[str, int]]:
        if not (self.step_directory(step) / INTEGRITY_ITEM).exists():
            return {}  # written before fingerprints existed
        try:
            record = self.manager.restore(step, args=ocp.args.Composite(
                **{INTEGRITY_ITEM: ocp.args.JsonRestore()}))[INTEGRITY_ITEM]
        except Exception as err:
            raise CheckpointError(f"{self.step_directory(step)}/{INTEGRITY_ITEM}: cannot read: "
                                  f"{_first_line(err)}") from None
        return record.get("fingerprints", {})

    def check_step(self, step: int, names: list[str] | tuple[str, ...] = ()) -> str | None:
        """What is structurally wrong with the step's folder (None if nothing): the folder or its
        commit marker missing, or one of the item folders `names` (and `meta`) missing."""
        folder = self.step_directory(step)
        if not folder.is_dir():
            return f"{folder} does not exist"
        if not (folder / COMMIT_MARKER).exists():
            return f"{folder} has no {COMMIT_MARKER} (an unfinished or partly copied save)"
        for name in (*names, META_ITEM):
            if not (folder / name).is_dir():
                return f"{folder}/{name} is missing"
        return None

    def restore_step(self, step: int, targets: Targets) -> tuple[dict[str, Any], dict]:
        """(trees, meta) of `step`, checked whole (folder, marker, items, fingerprints); raises
        CheckpointError naming what is wrong. `targets` may be a function of the step's meta."""
        problem = self.check_step(step, () if callable(targets) else tuple(targets))
        if problem is not None:
            raise CheckpointError(problem)
        _, meta = self.restore_meta(step)
        if callable(targets):
            targets = targets(meta)
            problem = self.check_step(step, tuple(targets))
            if problem is not None:
                raise CheckpointError(problem)
        return self.restore(step, targets), meta

    def restore_latest_good(self, targets: Targets, *,
                            set_aside: bool = True) -> tuple[int, dict[str, Any], dict]:
        """(step, trees, meta) of the newest checkpoint that restores intact.

        Damaged steps are skipped with a message naming their folder; with `set_aside` each is
        renamed `<step>.damaged-<unix time>` once an intact step is found (kept, so nothing is
        lost, but out of orbax's way so the step can be saved again). Raises CheckpointError when
        there is no checkpoint, or when every one is damaged (listing them; nothing is moved).
        `targets` may be a function of the step's meta (readers that rebuild the model from it).
        """
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"{self.directory}: no checkpoint to resume from")
        damaged: list[tuple[int, str]] = []
        for step in reversed(steps):
            try:
                trees, meta = self.restore_step(step, targets)
                problem = None
            except CheckpointError as err:
                problem = str(err)
            if problem is None:
                if damaged:
                    self.log(f"checkpoint: restored step {step} from {self.step_directory(step)} "
                             f"(skipped {len(damaged)} damaged)")
                    if set_aside:
                        for bad_step, _ in damaged:
                            self._set_aside(bad_step)
                return step, trees, meta
            self.log(f"checkpoint: skipping damaged step {step} in {self.step_directory(step)}: {problem}")
            damaged.append((step, problem))
        raise CheckpointError(f"{self.directory}: every checkpoint is damaged (none moved): "
                              + "; ".join(f"{self.step_directory(s)}: {p}" for s, p in damaged))

    def _set_aside(self, step: int) -> None:
        folder = self.step_directory(step)
        if jax.process_index() == 0 and folder.exists():
            target = folder.with_name(f"{step}.damaged-{int(time.time())}")
            suffix = 0
            while target.exists():
                suffix += 1
                target = folder.with_name(f"{step}.damaged-{int(time.time())}-{suffix}")
            folder.rename(target)
            self.log(f"checkpoint: moved {folder} to {target}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"tradojax_checkpoint_set_aside_{step}")
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()


# ----------------------------------------------------------------------------------------------
# Reading a run's steps from outside the trainer (export-hf, sample, eval)
# ----------------------------------------------------------------------------------------------

RUN_CHECKPOINTS = "checkpoints"  # a run directory keeps its steps in <run>/checkpoints/<step>/


def _is_step_folder(path: Path) -> bool:
    return path.name.isdigit() and path.is_dir() and ((path / META_ITEM).is_dir() or (path / COMMIT_MARKER).exists())


def find_training_steps(path: str | Path) -> tuple[Path, int | None] | None:
    """Where the training steps behind `path` live, and the step it names: (checkpoints directory,
    step or None). `path` is a run directory (`<run>/checkpoints/<step>/`), its checkpoints
    directory, or one step folder. None when `path` is none of these."""
    path = Path(path).absolute()
    if not path.is_dir():
        return None
    if _is_step_folder(path):
        return path.parent, int(path.name)
    for directory in (path / RUN_CHECKPOINTS, path):
        if directory.is_dir() and any(_is_step_folder(child) for child in directory.iterdir()):
            return directory, None
    return None


def read_training_step(path: str | Path, targets: Targets, *, step: int | None = None,
                       log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any], dict]:
    """(step folder, trees, meta) read from a run directory, its checkpoints directory or a step folder.

    Without `step` (and unless `path` is a step folder) this is the newest intact step: damaged
    ones are skipped with a message, as a resumed run does, but left where they are (a reader
    never moves a run's files). A named step must itself be intact.
    """
    found = find_training_steps(path)
    if found is None:
        raise CheckpointError(f"{path}: not a training run (no {RUN_CHECKPOINTS}/<step>/ folders)")
    directory, named = found
    if step is not None and named is not None and step != named:
        raise CheckpointError(f"{path}: is the folder of step {named}, but step {step} was asked for")
    step = named if step is None else step
    checkpointer = TrainCheckpointer(directory, create=False, log=log)
    try:
        if step is None:
            step, trees, meta = checkpointer.restore_latest_good(targets, set_aside=False)
        else:
            if step not in checkpointer.all_steps():
                raise CheckpointError(f"{directory}: no step {step} (steps: {checkpointer.all_steps() or 'none'})")
            trees, meta = checkpointer.restore_step(step, targets)
    finally:
        checkpointer.close()
    return Path(str(checkpointer.step_directory(step))), trees, meta


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__

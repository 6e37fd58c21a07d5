"""grain input pipelines (sharded across hosts, resumable) and RL task sampling.

* :func:`make_dataset` builds ``source -> shuffle(seed) -> repeat(epochs) -> shard -> map -> batch``
  as a ``grain.MapDataset``. Every host shuffles the same way (same seed) and keeps every
  ``shard_count``-th element of the global stream, so shards are disjoint, cover the data, and are
  reshuffled each epoch; the stream is cut to a multiple of ``shard_count`` so hosts see the same
  number of batches (a host with one batch more would hang a collective).
* :class:`DataIterator` wraps grain's iterator; ``get_state``/``set_state`` resume exactly and refuse a
  state saved by a differently configured pipeline (different seed, shard, batch size or data size).
* :class:`TaskSampler` picks the RL tasks of each step: ``num_task_per_step`` distinct tasks (global,
  split over hosts without overlap, which the original's per-node shuffles did not guarantee), each
  replicated ``num_response_per_task`` times. Step t's tasks are a pure function of (seed, t), so
  resuming is exact.

This module imports jax only to default the shard to ``jax.process_index()/process_count()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, Literal, TypeVar

import grain
import numpy as np

T = TypeVar("T")
SamplingMode = Literal["independent", "epoch"]


def resolve_shard(shard_index: int | None = None, shard_count: int | None = None) -> tuple[int, int]:
    """(index, count) of this host's shard; both None means ``jax.process_index()/process_count()``."""
    if shard_index is None and shard_count is None:
        import jax

        return int(jax.process_index()), int(jax.process_count())
    if shard_index is None or shard_count is None:
        raise ValueError("give both shard_index and shard_count, or neither (to use the jax process index/count)")
    if isinstance(shard_count, bool) or not isinstance(shard_count, int) or shard_count < 1:
        raise ValueError(f"shard_count must be a positive int, got {shard_count!r}")
    if isinstance(shard_index, bool) or not isinstance(shard_index, int) or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be an int in [0, {shard_count}), got {shard_index!r}")
    return shard_index, shard_count


def default_collate(items: Sequence[Any]) -> Any:
    """Stack a batch: dicts of arrays -> dict of stacked arrays, arrays/numbers -> one array,
    anything else (task records, ragged lists) -> a list."""
    first = items[0]
    if isinstance(first, Mapping) and all(isinstance(v, (np.ndarray, np.generic, int, float)) for v in first.values()):
        return {key: np.stack([np.asarray(item[key]) for item in items]) for key in first}
    if isinstance(first, (np.ndarray, np.generic, int, float)) and not isinstance(first, bool):
        return np.stack([np.asarray(item) for item in items])
    return list(items)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What determines a pipeline's element order; saved with iterator state to catch mismatches."""

    batch_size: int
    seed: int
    shuffle: bool = True
    num_epochs: int | None = 1
    drop_remainder: bool = True
    shard_index: int = 0
    shard_count: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.num_epochs is not None and (not isinstance(self.num_epochs, int) or self.num_epochs < 1):
            raise ValueError(f"num_epochs must be a positive int or None (repeat forever), got {self.num_epochs!r}")
        resolve_shard(self.shard_index, self.shard_count)


def make_dataset(
    records: Sequence[T],
    config: PipelineConfig,
    *,
    transform: Callable[[T], Any] | None = None,
    collate: Callable[[Sequence[Any]], Any] | None = default_collate,
) -> grain.MapDataset:
    """The batched, sharded ``grain.MapDataset`` over ``records`` (see module docstring)."""
    if len(records) == 0:
        raise ValueError("records is empty")
    dataset = grain.MapDataset.source(records)
    if config.shuffle:
        dataset = dataset.shuffle(seed=config.seed)
    if config.num_epochs != 1:
        dataset = dataset.repeat(config.num_epochs, reseed_each_epoch=True)
    if config.shard_count > 1:
        if config.num_epochs is not None:
            usable = len(dataset) // config.shard_count * config.shard_count
            dataset = dataset[:usable]
        dataset = dataset[config.shard_index :: config.shard_count]
    if transform is not None:
        dataset = dataset.map(transform)
    return dataset.batch(config.batch_size, drop_remainder=config.drop_remainder, batch_fn=collate)


class DataIterator(Iterator[Any]):
    """Resumable iterator over a grain dataset; state is a small JSON-friendly dict."""

    def __init__(self, dataset: grain.MapDataset, signature: Mapping[str, Any], *, prefetch_threads: int = 2):
        self.dataset = dataset
        self.signature = dict(signature)
        read_options = grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=8 if prefetch_threads else 0)
        self._iterator = iter(dataset.to_iter_dataset(read_options))

    def __next__(self) -> Any:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        """The position in the stream plus the pipeline's signature."""
        return {"grain": self._iterator.get_state(), "signature": dict(self.signature)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a state saved by :meth:`get_state` of an identically configured pipeline."""
        if not isinstance(state, Mapping) or "grain" not in state or "signature" not in state:
            raise ValueError("iterator state must be a dict with 'grain' and 'signature' (from get_state())")
        saved = dict(state["signature"])
        if saved != self.signature:
            differing = sorted(k for k in set(saved) | set(self.signature) if saved.get(k) != self.signature.get(k))
            details = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {self.signature.get(k)!r}" for k in differing)
            raise ValueError(f"iterator state comes from a differently configured pipeline ({details})")
        self._iterator.set_state(dict(state["grain"]))


def make_iterator(
    records: Sequence[T],
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    drop_remainder: bool = True,
    shard_index: int | None = None,
    shard_count: int | None = None,
    transform: Callable[[T], Any] | None = None,
    collate: Callable[[Sequence[Any]], Any] | None = default_collate,
    prefetch_threads: int = 2,
) -> DataIterator:
    """A resumable batch iterator over ``records`` for this host's shard."""
    index, count = resolve_shard(shard_index, shard_count)
    config = PipelineConfig(
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        drop_remainder=drop_remainder,
        shard_index=index,
        shard_count=count,
    )
    dataset = make_dataset(records, config, transform=transform, collate=collate)
    signature = {**dataclasses.asdict(config), "num_records": len(records)}
    return DataIterator(dataset, signature, prefetch_threads=prefetch_threads)


def pad_sequences(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    *,
    side: Literal["left", "right"] = "left",
    buckets: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pad token-id sequences to one length: the longest, rounded up to the smallest fitting bucket.

    Returns ``(ids int32 [B, L], mask bool [B, L])``; prompts pad on the left, responses on the right.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if len(sequences) == 0:
        raise ValueError("no sequences to pad")
    longest = max(len(s) for s in sequences)
    length = longest
    if buckets is not None:
        fitting = sorted(b for b in buckets if b >= longest)
        if not fitting:
            raise ValueError(f"sequence length {longest} exceeds the largest bucket {max(buckets)}")
        length = fitting[0]
    ids = np.full((len(sequences), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(sequences), length), dtype=bool)
    for row, sequence in enumerate(sequences):
        n = len(sequence)
        if n == 0:
            continue
        span = slice(length - n, length) if side == "left" else slice(0, n)
        ids[row, span] = np.asarray(sequence, dtype=np.int32)
        mask[row, span] = True
    return ids, mask


@dataclasses.dataclass(frozen=True)
class TaskStep(Generic[T]):
    """The tasks of one RL step on this host; rollout order is task-major (a task's responses adjacent)."""

    step: int
    task_indices: tuple[int, ...]
    tasks: tuple[T, ...]
    num_response_per_task: int

    @property
    def rollout_tasks(self) -> list[T]:
        """Each task repeated ``num_response_per_task`` times, consecutively."""
        return [task for task in self.tasks for _ in range(self.num_response_per_task)]

    @property
    def rollout_task_indices(self) -> np.ndarray:
        """Dataset index of each rollout row."""
        return np.repeat(np.asarray(self.task_indices, dtype=np.int64), self.num_response_per_task)

    @property
    def group_ids(self) -> np.ndarray:
        """Group (= local task position) of each rollout row, for per-group reward normalisation."""
        return np.repeat(np.arange(len(self.tasks), dtype=np.int32), self.num_response_per_task)


class TaskSampler(Generic[T]):
    """Deterministic, resumable per-step RL task selection, sharded across hosts.

    ``mode="independent"`` (the original's behaviour): each step draws ``num_task_per_step`` distinct
    tasks at random, independently of other steps (tasks recur across steps). ``mode="epoch"``: steps
    walk through a fresh permutation per epoch, so each epoch sees every task at most once (the last
    ``len(tasks) % num_task_per_step`` of each permutation are skipped).
    """

    def __init__(
        self,
        tasks: Sequence[T],
        *,
        num_task_per_step: int,
        num_response_per_task: int,
        seed: int,
        mode: SamplingMode = "independent",
        shard_index: int | None = None,
        shard_count: int | None = None,
        start_step: int = 0,
    ):
        self.shard_index, self.shard_count = resolve_shard(shard_index, shard_count)
        for name, value in (("num_task_per_step", num_task_per_step), ("num_response_per_task", num_response_per_task)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_task_per_step > len(tasks):
            raise ValueError(f"num_task_per_step={num_task_per_step} exceeds the {len(tasks)} available tasks")
        if num_task_per_step % self.shard_count:
            raise ValueError(
                f"num_task_per_step={num_task_per_step} must be divisible by the number of hosts ({self.shard_count})"
            )
        if mode not in ("independent", "epoch"):
            raise ValueError(f"mode must be 'independent' or 'epoch', got {mode!r}")
        self.tasks = tasks
        self.num_task_per_step = num_task_per_step
        self.num_response_per_task = num_response_per_task
        self.seed = int(seed)
        self.mode = mode
        self.next_step = int(start_step)

    def _global_indices(self, step: int) -> np.ndarray:
        n, k = len(self.tasks), self.num_task_per_step
        if self.mode == "independent":
            rng = np.random.default_rng([self.seed, step, 0x7A5C])
            return rng.choice(n, size=k, replace=False)
        steps_per_epoch = n // k
        epoch, position = divmod(step, steps_per_epoch)
        permutation = np.random.default_rng([self.seed, epoch, 0xE90C]).permutation(n)
        return permutation[position * k : (position + 1) * k]

    def step_tasks(self, step: int) -> TaskStep[T]:
        """This host's tasks for ``step`` (a pure function of seed, step and shard)."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        local = self._global_indices(int(step))[self.shard_index :: self.shard_count]
        indices = tuple(int(i) for i in local)
        return TaskStep(
            step=int(step),
            task_indices=indices,
            tasks=tuple(self.tasks[i] for i in indices),
            num_response_per_task=self.num_response_per_task,
        )

    def __iter__(self) -> TaskSampler[T]:
        return self

    def __next__(self) -> TaskStep[T]:
        result = self.step_tasks(self.next_step)
        self.next_step += 1
        return result

    def _signature(self) -> dict[str, Any]:
        return {
            "num_tasks": len(self.tasks),
            "num_task_per_step": self.num_task_per_step,
            "num_response_per_task": self.num_response_per_task,
            "seed": self.seed,
            "mode": self.mode,
            "shard_index": self.shard_index,
            "shard_count": self.shard_count,
        }

    def get_state(self) -> dict[str, Any]:
        """The next step to sample plus the sampler's signature (JSON-friendly)."""
        return {"next_step": self.next_step, "signature": self._signature()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`get_state` of an identically configured sampler."""
        if not isinstance(state, Mapping) or "next_step" not in state or "signature" not in state:
            raise ValueError("sampler state must be a dict with 'next_step' and 'signature' (from get_state())")
        saved, now = dict(state["signature"]), self._signature()
        if saved != now:
            differing = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            details = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {now.get(k)!r}" for k in differing)
            raise ValueError(f"sampler state comes from a differently configured sampler ({details})")
        self.next_step = int(state["next_step"])

"""Length buckets and the batch schedule of SFT.

Every example belongs to one (L0, L1) bucket: its prompt and response lengths rounded up (to a
power of two, or a multiple) and capped at the longest example. Each example yields a fixed number
of rows (1 for block SFT, the trace rounds, the semi-AR blocks, m random maskings). An epoch
shuffles the examples, lays their rows out bucket by bucket, cuts each bucket's rows into batches
of `batch_size` (the last one padded with rows that weigh 0), and shuffles the batch order. So each
batch comes from one bucket (one compiled shape per bucket) and batch `step` is a pure function of
(seed, step): a resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from tradojax.sft.config import SFTConfig
from tradojax.training.rows import round_up

Bucket = tuple[int, int]


def bucket_length(length: int, sft: SFTConfig, multiple_of: int, longest: int) -> int:
    """The padded length of a sequence of `length` tokens (capped at the padded `longest`)."""
    cap = round_up(max(longest, 1), multiple_of)
    if sft.buckets == "single":
        return cap
    length = max(length, 1)
    if sft.buckets == "pow2":
        padded = max(sft.min_bucket, 1 << (length - 1).bit_length())
    else:
        padded = round_up(length, sft.bucket_multiple)
    return min(round_up(padded, multiple_of), cap)


def assign_buckets(prompt_lengths: Sequence[int], response_lengths: Sequence[int], sft: SFTConfig,
                   response_multiple: int) -> list[Bucket]:
    """(L0, L1) of every example: prompts padded to multiples of 8, responses of the block size."""
    longest_prompt, longest_response = max(prompt_lengths), max(response_lengths)
    return [(bucket_length(p, sft, 8, longest_prompt), bucket_length(r, sft, response_multiple, longest_response))
            for p, r in zip(prompt_lengths, response_lengths)]


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
    """One update's rows: (example, row-within-example) pairs from a single bucket."""

    bucket: Bucket
    entries: tuple[tuple[int, int], ...]


class BatchPlan:
    """The seeded epoch-by-epoch batch schedule over examples with known row counts."""

    def __init__(self, buckets: Sequence[Bucket], row_counts: Sequence[int], batch_size: int, seed: int):
        if len(buckets) != len(row_counts):
            raise ValueError("BatchPlan: one bucket and one row count per example")
        if sum(row_counts) == 0:
            raise ValueError("SFT: no example yields a training row (every response is empty?)")
        self.buckets = list(buckets)
        self.row_counts = [int(c) for c in row_counts]
        self.batch_size = batch_size
        self.seed = seed
        rows_per_bucket: dict[Bucket, int] = {}
        for bucket, count in zip(self.buckets, self.row_counts):
            rows_per_bucket[bucket] = rows_per_bucket.get(bucket, 0) + count
        self.rows_per_bucket = dict(sorted(rows_per_bucket.items()))
        self.batches_per_epoch = sum(-(-n // batch_size) for n in self.rows_per_bucket.values() if n)

    @functools.lru_cache(maxsize=2)
    def epoch(self, epoch: int) -> tuple[PlannedBatch, ...]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.buckets))
        rows: dict[Bucket, list[tuple[int, int]]] = {bucket: [] for bucket in self.rows_per_bucket}
        for i in order.tolist():
            rows[self.buckets[i]].extend((i, r) for r in range(self.row_counts[i]))
        batches = []
        for bucket, entries in rows.items():
            for start in range(0, len(entries), self.batch_size):
                batches.append(PlannedBatch(bucket, tuple(entries[start:start + self.batch_size])))
        shuffle = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
        return tuple(batches[i] for i in shuffle)

    def locate(self, step: int) -> tuple[int, PlannedBatch]:
        """(epoch, batch) of update `step` (0-based)."""
        epoch, index = divmod(step, self.batches_per_epoch)
        return epoch, self.epoch(epoch)[index]

    def fingerprint(self) -> dict:
        """What a resumed run must share with the run it continues (checked on restore)."""
        return {"examples": len(self.buckets), "rows": sum(self.row_counts), "batch_size": self.batch_size,
                "buckets": [[list(b), n] for b, n in self.rows_per_bucket.items()], "seed": self.seed}

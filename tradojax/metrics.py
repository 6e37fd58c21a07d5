"""Per-step metrics of a run: a JSONL file and TensorBoard event files in the run directory."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


class MetricWriter:
    """Writes one JSON line (and TensorBoard scalars, when tensorboardX is installed) per record.

    Opened with the history its checkpoint covers: the JSONL is rewritten to exactly those records,
    so a resumed run that redoes the steps after its last save does not list them twice.
    `tb_prefix` goes before scalar names that have no section of their own (e.g. "sft/loss").
    In a multi-host job only process 0 writes (the others' writers do nothing).
    """

    def __init__(self, workdir: str | Path, filename: str, *, history: Sequence[dict] = (), tb_prefix: str = ""):
        import jax

        self.jsonl = self.tb = None
        if jax.process_index() != 0:
            return
        workdir = Path(workdir)
        self.tb_prefix = tb_prefix
        self.jsonl = open(workdir / filename, "w")
        self.jsonl.writelines(json.dumps(record) + "\n" for record in history)
        self.jsonl.flush()
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, record: dict) -> None:
        if self.jsonl is None:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for name, value in record.items():
                if isinstance(value, (int, float)) and name != "step":
                    self.tb.add_scalar(name if "/" in name else self.tb_prefix + name, value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

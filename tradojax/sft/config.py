"""SFT options that are not part of the shared `Config` (`tradojax sft` takes them as flags).

Modes (spec section 5):
  * `block` (sdar): the original's `semi-ar` for block-diffusion models: one `[prompt | clean |
    noisy]` row per example, each response position masked with p_j ~ U(lower_p, upper_p), every
    block trained at once on the clean blocks before it.
  * `trace` (any family): imitation of a decoding order (`step_map`, else left to right). For sdar
    the TraceRL rounds per training block (spec 3.3); for llada/dream the full-attention rounds of
    spec 3.10 (one row per `shrink` distinct steps over the whole response).
  * `semi_ar` (llada/dream): one single-stream row per response block i (blocks of
    `train.block_size`, or groups of `train.block_size` distinct `step_map` steps): later blocks
    fully masked, block i partly masked, earlier blocks clean; loss on block i's masked tokens.
  * `random_masking` (llada/dream): `mask_times_per_sample` rows per example, each masking the
    response with one t ~ U(lower_p, upper_p).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from tradojax.config import ConfigError

Mode = Literal["block", "trace", "semi_ar", "random_masking"]
Buckets = Literal["pow2", "multiple", "single"]

MODES: tuple[str, ...] = ("block", "trace", "semi_ar", "random_masking")
# Dual-stream (block-causal) modes and single-stream (full attention) modes per model family.
FAMILY_MODES: dict[str, tuple[str, ...]] = {
    "sdar": ("block", "trace"),
    "llada": ("semi_ar", "random_masking", "trace"),
    "dream": ("semi_ar", "random_masking", "trace"),
}


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """How SFT rows are built and batched, and when the trainer saves and evaluates."""

    mode: Mode = "block"
    shrink: int = 1  # trace modes: merge groups of `shrink` consecutive distinct steps (training.shrink)
    mask_times_per_sample: int = 1  # random_masking: rows per example (m; LLaDA 1, Dream 35)
    # Length buckets: examples are grouped by padded (prompt, response) lengths; each batch comes
    # from one bucket and each bucket shape compiles once. "pow2": the next power of two (at least
    # `min_bucket`); "multiple": the next multiple of `bucket_multiple`; "single": one bucket, the
    # longest example (every batch padded to it).
    buckets: Buckets = "pow2"
    bucket_multiple: int = 64
    min_bucket: int = 64
    save_every: int = 0  # steps between checkpoints (0: none, except on SIGTERM)
    eval_every: int = 0  # steps between held-out loss / sampling evals (0: none)
    # Sampling block sizes evaluated at each eval (block-size adaptation evaluates at the old and
    # the new size); empty: `sampling.block_size` only.
    eval_block_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"sft.mode: must be one of {list(MODES)}, got {self.mode!r}")
        if self.buckets not in ("pow2", "multiple", "single"):
            raise ConfigError(f"sft.buckets: must be 'pow2', 'multiple' or 'single', got {self.buckets!r}")
        for name in ("shrink", "mask_times_per_sample", "bucket_multiple", "min_bucket"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sft.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"sft.{name}: must be >= 0, got {getattr(self, name)}")
        for i, size in enumerate(self.eval_block_sizes):
            if size < 1:
                raise ConfigError(f"sft.eval_block_sizes[{i}]: must be >= 1, got {size}")

    def check_family(self, family: str) -> None:
        """Raises ConfigError when `mode` does not fit the model family's attention."""
        allowed = FAMILY_MODES.get(family, ())
        if self.mode not in allowed:
            hint = ("block-diffusion (sdar) models train with the dual-stream modes 'block' and 'trace'"
                    if family == "sdar" else
                    f"full-attention ({family}) models train with single-stream rows: 'semi_ar', "
                    "'random_masking' or 'trace'")
            raise ConfigError(f"sft.mode: {self.mode!r} does not apply to model.family={family!r}; {hint}")

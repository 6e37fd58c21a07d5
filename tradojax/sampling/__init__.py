"""Sampling: the block-diffusion rollout engine (SDAR/TraDo), its remasking strategies, and the
trace viewer. `tradojax sample` / `tradojax trace-view` live in `commands.py`."""

from tradojax.sampling.block_diffusion import (
    BlockDiffusionSampler,
    Progress,
    Rollout,
    generate,
)
from tradojax.sampling.strategies import STRATEGIES, sample_tokens, select_transfer, transfer_schedule

__all__ = [
    "BlockDiffusionSampler",
    "Progress",
    "Rollout",
    "STRATEGIES",
    "generate",
    "sample_tokens",
    "select_transfer",
    "transfer_schedule",
]

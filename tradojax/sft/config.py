"""SFT options: `Config.sft` (`--config.sft.mode=trace ...`), defined in `tradojax.config`.

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
  * `auto` (the default): block for sdar, random_masking for llada, semi_ar for dream (the
    original's defaults).
"""

from __future__ import annotations

from tradojax.config import SFT_DEFAULT_MODES, SFT_FAMILY_MODES, SFT_MODES, SFTConfig, SFTMode

Mode = SFTMode
MODES = SFT_MODES
FAMILY_MODES = SFT_FAMILY_MODES
DEFAULT_MODES = SFT_DEFAULT_MODES

__all__ = ["DEFAULT_MODES", "FAMILY_MODES", "MODES", "Mode", "SFTConfig"]

"""SDAR configuration for checkpoints exported by tradojax (loaded with `trust_remote_code=True`).

SDAR is a Qwen3 dense decoder trained for block diffusion, so the configuration is Qwen3's with
`model_type = "sdar"` and the extra SDAR keys of the released checkpoints (`block_size`,
`mask_token_id`, `fuse_cross_entropy`), which are kept as plain attributes.
"""

from transformers import Qwen3Config


class SDARConfig(Qwen3Config):
    model_type = "sdar"

    # Defaults of the extra SDAR keys when a config.json does not set them.
    block_size = 4
    mask_token_id = None
    fuse_cross_entropy = False


__all__ = ["SDARConfig"]

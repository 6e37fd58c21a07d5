"""Dream configuration for checkpoints exported by tradojax (loaded with `trust_remote_code=True`).

Dream is a Qwen2.5 decoder (q/k/v biases, no q/k norm) trained as a diffusion model, so the
configuration is Qwen2's with `model_type = "Dream"` and Dream's mask token id.
"""

from transformers import Qwen2Config


class DreamConfig(Qwen2Config):
    model_type = "Dream"

    # Default of the extra Dream key when a config.json does not set it (Dream-7B's mask token).
    mask_token_id = 151666


__all__ = ["DreamConfig"]

"""SDAR model classes for checkpoints exported by tradojax (loaded with `trust_remote_code=True`).

The network is `transformers`' Qwen3 decoder; what differs is attention masking, which follows the
SDAR checkpoints' convention: the model never builds a causal mask of its own (`diffusion_attention.py`): without
`attention_mask` attention is fully bidirectional; a 2-D or 4-D mask (entries > 0 visible) is
turned into an additive one. Block-diffusion callers pass the block-causal 4-D mask.
Use the "eager" or "sdpa" attention implementation (flash attention cannot take a 4-D mask).
The original's `store_kv` cache protocol is not implemented: pass the whole sequence.
"""

from torch import nn
from transformers import Qwen3ForCausalLM, Qwen3Model
from transformers.models.qwen3.modeling_qwen3 import Qwen3PreTrainedModel

from .configuration_sdar import SDARConfig
from .diffusion_attention import DiffusionDecoderMixin


class SDARModel(DiffusionDecoderMixin, Qwen3Model):
    config_class = SDARConfig


class SDARForCausalLM(Qwen3ForCausalLM):
    config_class = SDARConfig

    def __init__(self, config):
        Qwen3PreTrainedModel.__init__(self, config)  # not Qwen3ForCausalLM's: it would build a Qwen3Model
        self.model = SDARModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["SDARForCausalLM", "SDARModel"]

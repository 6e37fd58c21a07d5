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
from .diffusion_attention import additive_mask


class SDARModel(Qwen3Model):
    config_class = SDARConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.layers:
            layer.self_attn.is_causal = False  # block diffusion: the mask alone decides

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, length = reference.shape[:2]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        mask = additive_mask(attention_mask, batch, length, past + length, self.embed_tokens.weight.dtype,
                             reference.device)
        return super().forward(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, **kwargs)


class SDARForCausalLM(Qwen3ForCausalLM):
    config_class = SDARConfig

    def __init__(self, config):
        Qwen3PreTrainedModel.__init__(self, config)  # not Qwen3ForCausalLM's: it would build a Qwen3Model
        self.model = SDARModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["SDARForCausalLM", "SDARModel"]

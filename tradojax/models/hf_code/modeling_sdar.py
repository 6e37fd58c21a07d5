"""SDAR model classes for checkpoints exported by tradojax (loaded with `trust_remote_code=True`).

The network is `transformers`' Qwen3 decoder; what differs is attention masking, which follows the
SDAR checkpoints' convention:
  * the model never builds a causal mask of its own: without `attention_mask` attention is fully
    bidirectional;
  * `attention_mask` is 2-D [batch, keys] or 4-D [batch, 1, queries, keys], boolean or 0/1
    numbers, and entries > 0 are visible. It is turned into an additive mask (0 or the dtype's
    minimum). Block-diffusion callers pass the block-causal 4-D mask.
Use the "eager" or "sdpa" attention implementation (flash attention cannot take a 4-D mask).
The original's `store_kv` cache protocol is not implemented: pass the whole sequence.
"""

import torch
from torch import nn
from transformers import Qwen3ForCausalLM, Qwen3Model
from transformers.models.qwen3.modeling_qwen3 import Qwen3PreTrainedModel

from .configuration_sdar import SDARConfig


def sdar_additive_mask(attention_mask, batch, query_length, key_length, dtype, device):
    """SDAR mask (None, 2-D or 4-D; > 0 = visible) -> additive float mask [batch, 1, queries, keys]."""
    if attention_mask is None:
        return torch.zeros(batch, 1, query_length, key_length, dtype=dtype, device=device)
    if attention_mask.dim() == 2:
        visible = (attention_mask > 0)[:, None, None, :].expand(batch, 1, query_length, attention_mask.shape[-1])
    elif attention_mask.dim() == 4:
        visible = attention_mask > 0
    else:
        raise ValueError(
            f"SDAR attention_mask must be 2-D [batch, keys] or 4-D [batch, 1, queries, keys], got shape "
            f"{tuple(attention_mask.shape)}")
    bias = torch.zeros(visible.shape, dtype=dtype, device=device)
    return bias.masked_fill(~visible.to(device), torch.finfo(dtype).min)


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
        mask = sdar_additive_mask(attention_mask, batch, length, past + length,
                                  self.embed_tokens.weight.dtype, reference.device)
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

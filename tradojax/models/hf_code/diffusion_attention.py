"""The attention-mask convention shared by the SDAR, LLaDA and Dream model files that tradojax
exports (remote code, loaded with `trust_remote_code=True`).

Diffusion language models never build a causal mask of their own: without `attention_mask`,
attention is fully bidirectional. A given `attention_mask` is 2-D [batch, keys] (padding) or 4-D
[batch, 1, queries, keys] (e.g. block-causal), boolean or 0/1 numbers, entries > 0 visible.
"""

import torch


def additive_mask(attention_mask, batch, query_length, key_length, dtype, device):
    """None / 2-D / 4-D visibility mask -> additive float mask [batch, 1, queries, keys] (0 or dtype min)."""
    if attention_mask is None:
        return torch.zeros(batch, 1, query_length, key_length, dtype=dtype, device=device)
    if attention_mask.dim() == 2:
        visible = (attention_mask > 0)[:, None, None, :].expand(batch, 1, query_length, attention_mask.shape[-1])
    elif attention_mask.dim() == 4:
        visible = attention_mask > 0
    else:
        raise ValueError(
            f"attention_mask must be 2-D [batch, keys] or 4-D [batch, 1, queries, keys], got shape "
            f"{tuple(attention_mask.shape)}")
    bias = torch.zeros(visible.shape, dtype=dtype, device=device)
    return bias.masked_fill(~visible.to(device), torch.finfo(dtype).min)


class DiffusionDecoderMixin:
    """Put first in the bases of a `transformers` decoder model (Qwen2Model, Qwen3Model): its layers
    build no causal mask, and `forward` hands them the caller's mask made additive (`additive_mask`),
    the key length counting what a cache already holds."""

    def __init__(self, config):
        super().__init__(config)
        for layer in self.layers:
            layer.self_attn.is_causal = False  # diffusion: the mask alone decides

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, length = reference.shape[:2]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        mask = additive_mask(attention_mask, batch, length, past + length, self.embed_tokens.weight.dtype,
                             reference.device)
        return super().forward(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, **kwargs)


__all__ = ["DiffusionDecoderMixin", "additive_mask"]

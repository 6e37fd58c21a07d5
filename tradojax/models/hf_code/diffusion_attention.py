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


__all__ = ["additive_mask"]

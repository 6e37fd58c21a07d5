"""LLaDA model classes for checkpoints exported by tradojax (loaded with `trust_remote_code=True`).

A LLaDA "llama" block decoder written out in plain torch, with the tensor names of the released
LLaDA checkpoints (`model.transformer.wte`, `model.transformer.blocks.{i}.q_proj`, `attn_out`,
`ff_proj` (the SwiGLU gate), `up_proj`, `ff_out`, `attn_norm`, `ff_norm`, `ln_f`, and the output
projection `model.transformer.ff_out` unless `weight_tying`):
  * attention is bidirectional; `attention_mask` follows `diffusion_attention.py` (None: every
    token sees every token, as LLaDA's training and sampling call it);
  * RMSNorm in float32, RoPE (rotate-half) over the whole head, SwiGLU MLP, no biases except the
    optional q/k/v ones (`include_qkv_bias`);
  * logits are not shifted: the logit at position i scores token i.
Positions default to 0..T-1; `position_ids` may be given. No KV cache: pass the whole sequence.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from .configuration_llada import LLaDAConfig
from .diffusion_attention import additive_mask


class LLaDARMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rope(x, positions, theta):
    """x [batch, heads, tokens, head_dim], positions [batch, tokens]: rotate-half RoPE in float32."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim))
    angles = positions.float()[..., None] * inv_freq  # [batch, tokens, dim/2]
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    x32 = x.float()
    return (x32 * angles.cos() + rotate_half(x32) * angles.sin()).to(x.dtype)


class LLaDALlamaBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        d, head_dim = config.d_model, config.d_model // config.n_heads
        bias = bool(config.include_qkv_bias)
        self.attn_norm = LLaDARMSNorm(d, config.rms_norm_eps)
        self.ff_norm = LLaDARMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, config.n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d, config.n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d, config.n_kv_heads * head_dim, bias=bias)
        self.attn_out = nn.Linear(config.n_heads * head_dim, d, bias=False)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def forward(self, x, positions, bias):
        c = self.config
        batch, length, _ = x.shape
        head_dim = c.d_model // c.n_heads
        h = self.attn_norm(x)

        def heads(t, n):
            return t.view(batch, length, n, head_dim).transpose(1, 2)

        q = rope(heads(self.q_proj(h), c.n_heads), positions, c.rope_theta)
        k = rope(heads(self.k_proj(h), c.n_kv_heads), positions, c.rope_theta)
        v = heads(self.v_proj(h), c.n_kv_heads)
        repeat = c.n_heads // c.n_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim) + bias
        attn = torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)
        x = x + self.attn_out(attn.transpose(1, 2).reshape(batch, length, c.n_heads * head_dim))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAPreTrainedModel(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDALlamaBlock"]


class LLaDAModel(LLaDAPreTrainedModel):
    """The decoder; `forward` returns the final-normed hidden states."""

    def __init__(self, config):
        super().__init__(config)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.embedding_size, config.d_model),
            "blocks": nn.ModuleList([LLaDALlamaBlock(config) for _ in range(config.n_layers)]),
            "ln_f": LLaDARMSNorm(config.d_model, config.rms_norm_eps),
        })
        if not config.weight_tying:
            self.transformer["ff_out"] = nn.Linear(config.d_model, config.embedding_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer["wte"]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        x = self.transformer["wte"](input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = x.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(length, device=x.device)[None].expand(batch, length)
        bias = additive_mask(attention_mask, batch, length, length, torch.float32, x.device)
        for block in self.transformer["blocks"]:
            x = block(x, position_ids, bias)
        return BaseModelOutput(last_hidden_state=self.transformer["ln_f"](x))

    def logits(self, hidden):
        head = self.transformer["wte"].weight if self.config.weight_tying else self.transformer["ff_out"].weight
        return F.linear(hidden, head).float()


class LLaDAModelLM(LLaDAPreTrainedModel):
    """LLaDA with its output projection: `logits[:, i]` scores token i (no shift)."""

    def __init__(self, config):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds).last_hidden_state
        logits = self.model.logits(hidden)
        loss = None
        if labels is not None:  # unshifted: position i against label i (-100 ignored)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)


__all__ = ["LLaDAModel", "LLaDAModelLM"]

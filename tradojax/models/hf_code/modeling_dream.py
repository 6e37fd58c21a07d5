"""Dream model classes for checkpoints exported by tradojax (loaded with `trust_remote_code=True`).

The network is `transformers`' Qwen2 decoder (q/k/v biases) with bidirectional attention: the
model builds no causal mask, and `attention_mask` follows `diffusion_attention.py` (None: full
attention; 2-D padding or 4-D masks, entries > 0 visible). Logits are those of the autoregressive
initialisation, *shifted*: `logits[:, i]` scores token i + 1 (Dream's samplers shift them right by
one). `DreamModel` is the language model, as in the released Dream checkpoints (`AutoModel` and
`AutoModelForCausalLM` both give it). No KV cache protocol: pass the whole sequence.
"""

from torch import nn
from transformers import Qwen2ForCausalLM, Qwen2Model
from transformers.models.qwen2.modeling_qwen2 import Qwen2PreTrainedModel

from .configuration_dream import DreamConfig
from .diffusion_attention import additive_mask


class DreamBaseModel(Qwen2Model):
    config_class = DreamConfig

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


class DreamModel(Qwen2ForCausalLM):
    config_class = DreamConfig

    def __init__(self, config):
        Qwen2PreTrainedModel.__init__(self, config)  # not Qwen2ForCausalLM's: it would build a causal Qwen2Model
        self.model = DreamBaseModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["DreamBaseModel", "DreamModel"]

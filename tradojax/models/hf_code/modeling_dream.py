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
from .diffusion_attention import DiffusionDecoderMixin


class DreamBaseModel(DiffusionDecoderMixin, Qwen2Model):
    config_class = DreamConfig


class DreamModel(Qwen2ForCausalLM):
    config_class = DreamConfig

    def __init__(self, config):
        Qwen2PreTrainedModel.__init__(self, config)  # not Qwen2ForCausalLM's: it would build a causal Qwen2Model
        self.model = DreamBaseModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["DreamBaseModel", "DreamModel"]

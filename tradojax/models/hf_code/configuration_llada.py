"""LLaDA configuration for checkpoints exported by tradojax (loaded with `trust_remote_code=True`).

The field names are those of the released LLaDA checkpoints' config.json (`d_model`, `n_heads`,
`n_layers`, `mlp_hidden_size`, `embedding_size`, `weight_tying`, ...). Only the "llama" block
(RMSNorm, RoPE, SwiGLU, bidirectional attention) is described; tradojax writes nothing else.
"""

from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"

    def __init__(self, d_model=4096, n_heads=32, n_kv_heads=None, n_layers=32, mlp_hidden_size=12288,
                 vocab_size=126464, embedding_size=None, max_sequence_length=4096, rope_theta=500000.0,
                 rms_norm_eps=1e-5, weight_tying=False, include_qkv_bias=False, mask_token_id=126336,
                 init_std=0.02, **kwargs):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads if n_kv_heads is not None else n_heads
        self.n_layers = n_layers
        self.mlp_hidden_size = mlp_hidden_size
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size if embedding_size is not None else vocab_size
        self.max_sequence_length = max_sequence_length
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.weight_tying = weight_tying
        self.include_qkv_bias = include_qkv_bias
        self.mask_token_id = mask_token_id
        self.init_std = init_std
        # The model reads the embedding matrix itself when `weight_tying`: transformers ties nothing.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    # The generic names some transformers utilities look for.
    @property
    def hidden_size(self):
        return self.d_model

    @property
    def num_attention_heads(self):
        return self.n_heads

    @property
    def num_hidden_layers(self):
        return self.n_layers


__all__ = ["LLaDAConfig"]

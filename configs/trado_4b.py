"""TraDo-4B / SDAR-4B-Chat architecture (spec section 1.1; a Qwen3-4B backbone, untied head).

Weights: set `hf_checkpoint` to a local snapshot of Gen-Verse/TraDo-4B-Instruct (or SDAR-4B-Chat):
  --config.hf_checkpoint=/path/to/TraDo-4B-Instruct
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = dict(name="trado_4b", workdir="runs/trado_4b", seed=10086)
    config.model = dict(
        family="sdar",
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        block_size=4,
        mask_token_id=151669,
        eos_token_id=151643,
        pad_token_id=151643,
        # float32 master weights, bfloat16 compute: AdamW steps of lr 1e-6 vanish in bfloat16 weights
        param_dtype="float32",
        compute_dtype="bfloat16",
        remat="full",
        attention_impl="auto",
    )
    # the RL rollout's defaults (spec section 3.11)
    config.sampling = dict(block_size=4, denoising_steps=4, temperature=1.0, top_k=0, top_p=1.0,
                           remasking_strategy="low_confidence_dynamic", dynamic_threshold=0.9,
                           max_new_tokens=2000)
    # prompts end in "<|im_start|>assistant" as the original renders them (TraDo's training text)
    config.data = dict(strip_final_newline=True)
    config.hf_checkpoint = None
    config.tokenizer = "qwen3"
    return config

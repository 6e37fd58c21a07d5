"""TraDo-4B / SDAR-4B-Chat architecture (spec section 1.1; a Qwen3-4B backbone, untied head), and
its evaluation (spec 1.3: block 4, 2000 new tokens, dynamic T=0.9 sampled and static greedy, 3
samples per task) on a TPU slice of 4 chips or more:

  tradojax eval --config=configs/trado_4b.py --config.hf_checkpoint=/path/to/TraDo-4B-Instruct \
      --data /path/to/MATH500.json --out runs/trado_4b/math500.json

Sized for v5p:2x2x1, v6e:2x2 and v5e:2x2 (`tradojax aot --config=configs/trado_4b.py` compiles the
eval's programs for each): bfloat16 weights split over tensor=2 (the sampler computes in bfloat16
whatever the stored dtype, so results are those of float32 weights), the rest data-parallel, at
most 16 sequences resident per replica (the original's eval max_active).
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
        # bfloat16 weights for sampling; training configs keep float32 master weights (AdamW steps of
        # lr 1e-6 vanish in bfloat16 weights)
        param_dtype="bfloat16",
        compute_dtype="bfloat16",
        remat="full",
        attention_impl="auto",
    )
    # the RL rollout's defaults (spec section 3.11)
    config.sampling = dict(block_size=4, denoising_steps=4, temperature=1.0, top_k=0, top_p=1.0,
                           remasking_strategy="low_confidence_dynamic", dynamic_threshold=0.9,
                           max_new_tokens=2000, prompt_buckets=[256, 512, 784], max_active=16)
    config.eval = dict(strategies=["low_confidence_dynamic", "low_confidence_static"], top_k=[0, 1],
                       num_samples=3, max_new_tokens=2000, chunk_tasks=128)
    config.mesh = dict(data=-1, fsdp=1, tensor=2, slices=["v5p:2x2x1", "v6e:2x2", "v5e:2x2"])
    # prompts end in "<|im_start|>assistant" as the original renders them (TraDo's training text)
    config.data = dict(strip_final_newline=True)
    config.hf_checkpoint = None
    config.tokenizer = "qwen3"
    return config

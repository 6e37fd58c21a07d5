"""A tiny block-diffusion model for tests and the CPU demo (random init or trained by `tradojax demo`);
`tradojax rl --config configs/tiny.py` runs two smoke-test RL steps in a few CPU minutes."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = dict(name="tiny", workdir="runs/tiny", seed=0)
    config.model = dict(
        family="sdar",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=1_000_000.0,
        max_position_embeddings=512,
        block_size=4,
        # the tiny tokenizer's special ids (tradojax.data.tokenizer.build_tiny_tokenizer)
        mask_token_id=3,
        eos_token_id=0,
        pad_token_id=0,
        param_dtype="float32",
        compute_dtype="float32",
    )
    config.sampling = dict(block_size=4, denoising_steps=4, max_new_tokens=32, prompt_buckets=[32, 64, 128])
    config.tokenizer = "tiny"
    # The easiest synthetic level holds 345 distinct questions: ask for fewer.
    config.data = dict(synthetic_train_size=256, synthetic_eval_size=16)
    # `tradojax rl --config configs/tiny.py` is a smoke run: two small steps from random weights, whose
    # answers are never right (every group is filtered out: no update). configs/rl_tiny.py is RL that learns.
    config.rl = dict(steps=2, num_tasks_per_step=4, num_responses_per_task=4, reward_workers=1)
    return config

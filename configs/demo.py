"""`tradojax demo`: a small block-diffusion model learns synthetic arithmetic on CPU (SFT, then TraceRL)."""

import ml_collections

from tiny import get_config as tiny


def get_config() -> ml_collections.ConfigDict:
    config = tiny()
    config.experiment = dict(name="demo", workdir="runs/demo", seed=0)
    config.model.update(dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
                             head_dim=32, max_position_embeddings=256))
    config.sampling = dict(block_size=4, denoising_steps=4, max_new_tokens=24, prompt_buckets=[48, 64],
                           remasking_strategy="low_confidence_dynamic", dynamic_threshold=0.9,
                           stop_token_ids=[2])  # <|im_end|> ends an answer
    config.data = dict(train="synthetic", eval="synthetic", kind="math", synthetic_train_size=1500,
                       synthetic_eval_size=64, synthetic_difficulty=2, seed=0)
    config.train = dict(steps=300, batch_size=64, learning_rate=2e-3, schedule="cosine", warmup_steps=20,
                        min_lr_ratio=0.1, block_size=4, max_prompt_len=64, max_response_len=24)
    config.rl = dict(method="tracerl", steps=20, num_tasks_per_step=16, num_responses_per_task=8,
                     difficulty_lower=0.1, difficulty_upper=0.9, eval_every=5, save_every=5, beta=0.01)
    config.eval = dict(strategies=["low_confidence_dynamic"], top_k=[0], num_samples=4)
    return config

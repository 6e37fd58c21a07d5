"""SFT of the tiny block-diffusion model (configs/tiny.py) on CPU, e.g.

    tradojax sft --config configs/sft_tiny.py --synthetic 512
    tradojax sft --config configs/sft_tiny.py --data sft.jsonl --config.sft.mode=trace --resume
    # block-size adaptation: train at block 8, evaluate at 4 and 8
    tradojax sft --config configs/sft_tiny.py --synthetic 512 --config.train.block_size=8 \\
        --config.sft.eval_every=50 '--config.sft.eval_block_sizes=[4,8]'
"""

import tiny  # configs/tiny.py (config files may import their siblings)


def get_config():
    config = tiny.get_config()
    config.experiment = dict(name="sft_tiny", workdir="runs/sft_tiny", seed=0)
    # The original SFT recipe (spec 5): AdamW, cosine to 0, per-position p ~ U(0.1, 0.9), no pads
    # trained; a larger learning rate and smaller batch suit the tiny model.
    config.train = dict(steps=200, batch_size=16, learning_rate=2e-3, schedule="cosine", warmup_steps=10,
                        block_size=4, lower_p=0.1, upper_p=0.9, post_num=0, max_prompt_len=128,
                        max_response_len=64)
    config.data = dict(train="synthetic", eval="synthetic", kind="math", synthetic_train_size=256, synthetic_eval_size=16,
                       synthetic_difficulty=1, seed=0)
    config.eval = dict(strategies=["low_confidence_dynamic"], top_k=[0], num_samples=1)
    config.rl = dict(reward_workers=1)
    return config

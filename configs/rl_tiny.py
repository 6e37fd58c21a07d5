"""TraceRL on CPU in a few minutes: `tradojax rl --config configs/rl_tiny.py`.

The demo's 0.9M-parameter block-diffusion model and synthetic tasks (largest of 4 digits, 4 digits
reversed). A from-scratch model never answers right, so RL would see no reward: the `warm_start`
section runs 70 steps of block SFT on the tasks' worked solutions first (in <workdir>/warm_start),
then 20 TraceRL steps raise the rollout reward (metrics in <workdir>/metrics.jsonl). Switch the
method with --config.rl.method=coupled (or random_masking), add the value model with
--config.rl.value_model=True.
"""

from tradojax.demo import default_config


def get_config():
    config = default_config()
    config.experiment = dict(name="rl_tiny", workdir="runs/rl_tiny", seed=0)
    return config

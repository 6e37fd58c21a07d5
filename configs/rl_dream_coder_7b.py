"""TraceRL on Dream-Coder-7B with code-execution rewards, shrink 8: the paper's full-attention result
(TraceRL "applicable across architectures": 25.0% on LiveCodeBench-V2).

  tradojax rl --config=configs/rl_dream_coder_7b.py --config.hf_checkpoint=/path/to/Dream-Coder-v0-Instruct-7B \
      --config.data.train=/path/to/PrimeIntellect.json --config.data.eval=/path/to/LiveCodeBench.json

`rl_dream_7b.py` (the same Qwen2.5-7B-shaped architecture and Dream tokenizer; the rollout and RL
defaults of `rl_dream.yaml`) with the code data and rewards of `rl_sdar_code.yaml`: PrimeIntellect
train, LiveCodeBench eval, test execution. The same slice (v5p:2x2x1).
"""

from rl_dream_7b import get_config as rl_dream


def get_config():
    config = rl_dream()
    config.experiment.name = "rl_dream_coder_7b"
    config.experiment.workdir = "runs/rl_dream_coder_7b"
    config.data = dict(train="PrimeIntellect.json", eval="LiveCodeBench.json", kind="code")
    config.rl.shrink = 8
    return config

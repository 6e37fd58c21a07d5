"""What many tests share: the tiny model configs and repository paths that do not depend on the
working directory pytest was started from."""

from pathlib import Path

from tradojax.config import ModelConfig

REPO = Path(__file__).resolve().parent.parent

# ModelConfig's defaults are the tiny SDAR-style model (vocab 512, 2 layers, hidden 64, 4 heads, 2 KV
# heads; mask 3, EOS = pad = 0): the model of the sampler, RL and HF tests.
TINY_MODEL = ModelConfig()

# Smaller still (vocab 64, hidden 32, 2 heads, 1 KV head): losses checked by hand, learning tests,
# checkpoints.
MICRO_MODEL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)


def config_path(name: str) -> str:
    """A shipped config file (`configs/NAME`) as an absolute path."""
    return str(REPO / "configs" / name)

"""TraceRL with the diffusion value model (`rl_trado_with_value.yaml`, spec 3.7-3.8).

The value model is a second 4B with its own AdamW state, which doubles what the chips hold between
rollouts: sized for v5p:2x2x1 and v6e:2x4 (`tradojax aot --config=configs/rl_trado_4b_value.py`).
"""

from rl_trado_4b import get_config as rl_4b


def get_config():
    config = rl_4b()
    config.experiment.name = "rl_trado_4b_value"
    config.experiment.workdir = "runs/rl_trado_4b_value"
    config.rl.update(dict(value_model=True, value_learning_rate=5e-6, train_value_every=1, gamma=1.0, lam=1.0))
    config.train.learning_rate = 1e-6  # policy_learning_rate
    config.mesh.slices = ["v5p:2x2x1", "v6e:2x4"]
    return config

"""TraceRL with code-execution rewards (`rl_sdar_code.yaml`: PrimeIntellect train, LiveCodeBench eval).

The programs of `rl_trado_4b.py` (only the rewards differ), on the same slices (v5p:2x2x1, v6e:2x2).
"""

from rl_trado_4b import get_config as rl_4b


def get_config():
    config = rl_4b()
    config.experiment.name = "rl_sdar_code"
    config.experiment.workdir = "runs/rl_sdar_code"
    config.data = dict(train="PrimeIntellect.json", eval="LiveCodeBench.json", kind="code", strip_final_newline=True)
    return config

"""TraceRL with code-execution rewards (`rl_sdar_code.yaml`: PrimeIntellect train, LiveCodeBench eval)."""

from rl_trado_4b import get_config as rl_4b


def get_config():
    config = rl_4b()
    config.experiment.name = "rl_sdar_code"
    config.experiment.workdir = "runs/rl_sdar_code"
    config.data = dict(train="PrimeIntellect.json", eval="LiveCodeBench.json", kind="code", strip_final_newline=True)
    return config

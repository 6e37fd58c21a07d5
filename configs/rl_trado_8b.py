"""TraceRL on TraDo-8B with math rewards (`rl_trado.yaml` on the 8B architecture)."""

from rl_trado_4b import get_config as rl_4b
from trado_8b import get_config as architecture


def get_config():
    config = rl_4b()
    config.model = architecture().model
    config.experiment.name = "rl_trado_8b"
    config.experiment.workdir = "runs/rl_trado_8b"
    config.mesh = dict(data=-1, fsdp=4, tensor=1)  # 8B params + AdamW states want sharding
    return config

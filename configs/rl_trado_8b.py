"""TraceRL on TraDo-8B with math rewards (`rl_trado.yaml` on the 8B architecture).

Sized for v5p:2x2x1 and v6e:2x4 (`tradojax aot --config=configs/rl_trado_8b.py`): float32 master
weights and AdamW moments sharded over all chips, heads and MLP split over tensor=4; at most 16
sequences resident per replica (four chips). On v5p a data-parallel rollout is faster:
--config.mesh.fsdp=4 --config.mesh.tensor=1 --config.sampling.max_active=64; on v5e:4x4, use
--config.sampling.max_active=4.
"""

from rl_trado_4b import get_config as rl_4b
from trado_8b import get_config as architecture


def get_config():
    config = rl_4b()
    config.model = architecture().model
    config.model.param_dtype = "float32"  # master weights
    config.experiment.name = "rl_trado_8b"
    config.experiment.workdir = "runs/rl_trado_8b"
    config.sampling.max_active = 16
    config.mesh = dict(data=1, fsdp=-1, tensor=4, slices=["v5p:2x2x1", "v6e:2x4"])
    return config

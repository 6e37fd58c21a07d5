"""TraDo-8B / SDAR-8B-Chat architecture (spec section 1.1; a Qwen3-8B backbone, untied head).

Identical to `trado_4b.py` but for the widths. Weights: a local snapshot of Gen-Verse/TraDo-8B-Instruct
(or SDAR-8B-Chat): --config.hf_checkpoint=/path/to/TraDo-8B-Instruct

Its evaluation is sized for v5p:2x2x1, v6e:2x2 and v5e:2x2 (`tradojax aot --config=configs/trado_8b.py`):
bfloat16 weights split over tensor=4, at most 16 sequences resident per replica.
"""

from trado_4b import get_config as trado_4b


def get_config():
    config = trado_4b()
    config.experiment.update(dict(name="trado_8b", workdir="runs/trado_8b"))
    config.model.update(dict(hidden_size=4096, intermediate_size=12288))
    config.mesh.update(dict(data=-1, fsdp=1, tensor=4))
    return config

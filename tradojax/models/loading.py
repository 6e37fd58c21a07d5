"""The policy a config names: `hf_checkpoint` (a Hugging Face directory or a tradojax params
checkpoint), else a random initialisation of `config.model`."""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from tradojax.config import Config
from tradojax.models.transformer import Decoder, abstract_model, init_model


def load_policy(config: Config, mesh=None) -> Decoder:
    if config.hf_checkpoint is None:
        return init_model(config.model, seed=config.experiment.seed)
    path = Path(config.hf_checkpoint)
    if (path / "config.json").is_file():
        from tradojax.models.hf import load_hf_model

        model, _ = load_hf_model(path, mesh=mesh)
        return model
    from tradojax.models.hf import load_params_checkpoint

    model_config, params = load_params_checkpoint(path, mesh=mesh)
    graphdef, _ = nnx.split(abstract_model(model_config))
    return nnx.merge(graphdef, params)

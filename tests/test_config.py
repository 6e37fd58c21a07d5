"""Config files, overrides and validation errors that name the field."""

import dataclasses
import textwrap

import pytest

from helpers import config_path
from tradojax.config import Config, ConfigError, ModelConfig, from_dict, load_config, split_config_args


def test_repo_configs_load_with_documented_architectures():
    tiny = load_config(config_path("tiny.py"))
    assert tiny.model.num_layers == 2 and tiny.model.vocab_size == 512
    four = load_config(config_path("trado_4b.py"))
    m = four.model
    assert (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.intermediate_size) == (
        2560, 36, 32, 8, 128, 9728)
    assert (m.mask_token_id, m.eos_token_id, m.pad_token_id, m.rope_theta) == (151669, 151643, 151643, 1e6)
    assert not m.tie_word_embeddings
    assert 4.0e9 < m.num_params() < 4.5e9  # SDAR-4B-Chat: 4.41B with its untied head
    eight = load_config(config_path("trado_8b.py")).model
    assert (eight.hidden_size, eight.intermediate_size) == (4096, 12288)
    assert 8.0e9 < eight.num_params() < 8.3e9


def test_command_line_overrides():
    path, overrides, rest = split_config_args(
        ["--config=configs/tiny.py", "--config.model.num_layers=3", "--config.sampling.top_p", "0.5", "--x"])
    assert path == "configs/tiny.py" and rest == ["--x"]
    config = load_config(path, overrides)
    assert config.model.num_layers == 3 and config.sampling.top_p == 0.5
    config = load_config(path, ["model.compute_dtype=bfloat16", "sampling.stop_token_ids=[2, 5]"])
    assert config.model.compute_dtype == "bfloat16" and config.sampling.stop_token_ids == (2, 5)


@pytest.mark.parametrize("override,field", [
    ("model.num_heads=5", "model.num_kv_heads"),  # 2 kv heads do not divide 5
    ("model.block_size=0", "model.block_size"),
    ("model.num_layers='two'", "model.num_layers"),
    ("model.compute_dtype=float16", "model.compute_dtype"),
    ("model.mask_token_id=9999", "model.mask_token_id"),
    ("sampling.denoising_steps=8", "sampling.denoising_steps"),
    ("sampling.dynamic_threshold=1.5", "sampling.dynamic_threshold"),
    ("sampling.top_p=0", "sampling.top_p"),
    ("mesh.fsdp=0", "mesh.fsdp"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(config_path("tiny.py"), [override])


def test_unknown_fields_and_sections_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.num_layer: unknown field"):
        from_dict(Config, {"model": {"num_layer": 2}})
    with pytest.raises(ConfigError, match=r"modle: unknown field"):
        from_dict(Config, {"modle": {}})
    with pytest.raises(ConfigError, match="model.nope"):
        load_config(config_path("tiny.py"), ["model.nope.x=1"])


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.py")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    with pytest.raises(ConfigError, match="broken.py failed to import"):
        load_config(broken)
    no_fn = tmp_path / "nofn.py"
    no_fn.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="no get_config"):
        load_config(no_fn)
    wrong = tmp_path / "wrong.py"
    wrong.write_text(textwrap.dedent("""
        import ml_collections
        def get_config():
            c = ml_collections.ConfigDict()
            c.model = dict(hidden_size=64.5)
            return c
    """))
    with pytest.raises(ConfigError, match=r"wrong.py: model\.hidden_size: expected int"):
        load_config(wrong)


@pytest.mark.parametrize("body, message", [
    ("def get_config():\n    raise RuntimeError('boom')\n", r"get_config\(\) raised RuntimeError: boom"),
    ("def get_config():\n    return get_config()\n", r"get_config\(\) raised RecursionError"),
    ("import sys\ndef get_config():\n    sys.exit(4)\n", r"get_config\(\) raised SystemExit: 4"),
    ("import sys\nsys.exit(4)\n", r"failed to import: SystemExit: 4"),
    ("get_config = 'not a function'\n", r"no get_config\(\) function"),
])
def test_config_files_that_raise_or_exit(tmp_path, body, message):
    path = tmp_path / "user_config.py"
    path.write_text(body)
    with pytest.raises(ConfigError, match=r"user_config\.py.*" + message):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("rl.steps.x=1", r"rl\.steps\.x: rl\.steps = 20 is a value, not a section"),
    ("tokenizer.x=1", r"tokenizer\.x: tokenizer = 'tiny' is a value"),
    ("sampling.prompt_buckets.0=3", r"sampling\.prompt_buckets = \[48, 64\] is a value"),
    ("model..x=1", r"'model\.\.x' is not a dotted field name"),
    ("rl.=1", r"'rl\.' is not a dotted field name"),
    ("model.vocab_size=4294967296", r"model\.vocab_size: must be < 2\*\*31"),
])
def test_override_mistakes_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config_path("rl_tiny.py"), [override])


def test_override_into_a_section_left_at_none(tmp_path):
    path = tmp_path / "none_section.py"
    path.write_text("def get_config():\n    return {'warm_start': None}\n")
    assert load_config(path, ["warm_start.steps=3"]).warm_start.steps == 3


def test_config_is_frozen_and_hashable():
    config = ModelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_layers = 4  # type: ignore[misc]
    assert hash(config) == hash(ModelConfig())

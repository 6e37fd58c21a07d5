"""Hugging Face interop without torch: key tables, config.json mapping, export <-> import round
trips, sharded files, native checkpoints, the import-hf/export-hf commands, and bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from tradojax import cli
from helpers import TINY_MODEL
from tradojax.checkpoint import CheckpointError
from tradojax.config import MeshConfig, ModelConfig
from tradojax.models import hf, hf_config, hf_keys, native, safetensors_io
from tradojax.models.transformer import abstract_model, param_paths
from tradojax.parallel.mesh import make_mesh
from tradojax.parallel.sharding import param_sharding

TINY = dataclasses.replace(TINY_MODEL, eos_token_id=1, pad_token_id=2)  # distinct ids: exports keep each
FAMILIES = {
    "sdar": TINY,
    "dream": dataclasses.replace(TINY, family="dream", qk_norm=False, qkv_bias=True),
    "llada": dataclasses.replace(TINY, family="llada", qk_norm=False, num_kv_heads=4, rms_norm_eps=1e-5),
}


def random_params(config: ModelConfig, seed: int = 0) -> nnx.State:
    """Every parameter random (norm weights around 1), in the config's param dtype."""
    abstract = nnx.split(abstract_model(config))[1]
    keys = iter(jax.random.split(jax.random.key(seed), 64))

    def fill(path, leaf):
        value = jax.random.normal(next(keys), leaf.shape, jnp.float32) * 0.1
        if "norm" in str(path[-1]):
            value = value + 1.0
        return leaf.replace(value.astype(leaf.dtype))

    return nnx.map_state(fill, abstract)


def flat_numpy(params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v[...] if isinstance(v, nnx.Variable) else v) for k, v in param_paths(params).items()}


def assert_bit_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs"


@pytest.fixture(scope="module")
def sdar_dir(tmp_path_factory):
    """A small multi-file SDAR export of random f32 weights."""
    out = tmp_path_factory.mktemp("sdar") / "hf"
    hf.save_hf_model((TINY, random_params(TINY)), out, max_shard_bytes=100_000)
    return out


# ------------------------------------------------------------------------- tables and config


def test_key_table_is_two_way_for_every_family():
    for family, config in FAMILIES.items():
        rules = hf_keys.key_table(config)
        names = [rule.name(layer) for rule in rules
                 for layer in (range(config.num_layers) if rule.stacked else [None])]
        assert len(names) == len(set(names)), family
        sizes = hf_keys.dim_sizes(config)
        shapes = {p: leaf.shape for p, leaf in param_paths(nnx.split(abstract_model(config))[1]).items()}
        rng = np.random.default_rng(0)
        for rule in rules:
            ours = rng.normal(size=shapes[rule.param][1:] if rule.stacked else shapes[rule.param])
            torch_layout = rule.to_hf(ours, sizes)
            assert torch_layout.shape == rule.hf_shape(sizes)
            full = {d: (0, sizes[d]) for group in rule.hf_dims for d in group}
            np.testing.assert_array_equal(rule.to_ours(torch_layout, sizes, full), ours)
    sdar_names = {rule.name(0) for rule in hf_keys.key_table(TINY)}
    assert "model.layers.0.self_attn.q_norm.weight" in sdar_names
    assert "model.layers.0.self_attn.q_proj.bias" not in sdar_names
    dream_names = {rule.name(0) for rule in hf_keys.key_table(FAMILIES["dream"])}
    assert "model.layers.0.self_attn.q_proj.bias" in dream_names
    assert "model.layers.0.self_attn.q_norm.weight" not in dream_names
    llada_names = {rule.name(1) for rule in hf_keys.key_table(FAMILIES["llada"])}
    assert {"model.transformer.wte.weight", "model.transformer.blocks.1.attn_out.weight",
            "model.transformer.blocks.1.ff_proj.weight", "model.transformer.ff_out.weight",
            "model.transformer.ln_f.weight"} <= llada_names


def test_q_proj_layout_matches_torch_linear():
    """torch q_proj.weight[h*hd + k, d] is our q_proj[d, h, k]; o_proj.weight[d, h*hd + k] is o_proj[h, k, d]."""
    sizes = hf_keys.dim_sizes(TINY)
    rules = {rule.param: rule for rule in hf_keys.key_table(TINY)}
    rng = np.random.default_rng(1)
    q = rng.normal(size=(64, 4, 16))
    torch_q = rules["layers.q_proj"].to_hf(q, sizes)
    assert torch_q[2 * 16 + 5, 7] == q[7, 2, 5]
    o = rng.normal(size=(4, 16, 64))
    torch_o = rules["layers.o_proj"].to_hf(o, sizes)
    assert torch_o[9, 3 * 16 + 1] == o[3, 1, 9]
    # a shard's block: heads [2, 4), embed [32, 64) read from rows 32..64 and columns 32..64
    bounds = {"embed": (32, 64), "heads": (2, 4), "head_dim": (0, 16)}
    slices = rules["layers.q_proj"].hf_slices(sizes, bounds)
    assert slices == (slice(32, 64), slice(32, 64))
    block = rules["layers.q_proj"].to_ours(torch_q[slices], sizes, bounds)
    np.testing.assert_array_equal(block, q[32:64, 2:4, :])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_config_round_trips_through_config_json(family):
    config = dataclasses.replace(FAMILIES[family], param_dtype="bfloat16", compute_dtype="bfloat16",
                                 rope_theta=5e5, tie_word_embeddings=family == "llada")
    data = hf_config.model_config_to_hf(config)
    assert hf_config.model_config_from_hf(data) == config
    if family == "sdar":
        assert data["model_type"] == "sdar" and data["architectures"] == ["SDARForCausalLM"]
        assert data["auto_map"]["AutoModelForCausalLM"] == "modeling_sdar.SDARForCausalLM"
        assert (data["block_size"], data["mask_token_id"], data["torch_dtype"]) == (4, 3, "bfloat16")
        assert data["bos_token_id"] == data["eos_token_id"] == 1 and data["rope_theta"] == 5e5


def test_sdar_4b_chat_config_json():
    """The config.json of the released SDAR-4B-Chat checkpoints (spec 1.1), with its extra keys."""
    data = {
        "architectures": ["SDARForCausalLM"], "model_type": "sdar",
        "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
                     "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
        "attention_bias": False, "attention_dropout": 0.0, "attn_implementation": "flex_attention",
        "block_size": 4, "bos_token_id": 151643, "eos_token_id": 151643, "mask_token_id": 151669,
        "fuse_cross_entropy": True, "debug": False, "ep_size": 1, "micro_forward": False,
        "skip_checkpoint": False, "use_deepep": False, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 2560, "initializer_range": 0.02, "intermediate_size": 9728,
        "max_position_embeddings": 32768, "max_window_layers": 36, "num_attention_heads": 32,
        "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": False, "use_sliding_window": False, "vocab_size": 151936,
    }
    config = hf_config.model_config_from_hf(data)
    assert config == ModelConfig(
        family="sdar", vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=1e6, max_position_embeddings=32768, block_size=4,
        mask_token_id=151669, eos_token_id=151643, pad_token_id=151643, param_dtype="bfloat16",
        compute_dtype="bfloat16")
    assert 4.0e9 < config.num_params() < 4.5e9
    written = hf_config.model_config_to_hf(config)
    assert {k: written[k] for k in data if k in written and k != "fuse_cross_entropy"} == {
        k: v for k, v in data.items() if k in written and k != "fuse_cross_entropy"}
    assert written["fuse_cross_entropy"] is False  # dLLM-RL sets it False: always return logits


def test_config_json_variants():
    base = hf_config.model_config_to_hf(TINY)
    # transformers 5 writes rope_parameters/dtype; Qwen2 has no head_dim; eos may be a list
    modern = {k: v for k, v in base.items() if k not in ("rope_theta", "torch_dtype", "head_dim", "auto_map")}
    modern.update(model_type="qwen2", rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                  dtype="float32", eos_token_id=[1, 5])
    config = hf_config.model_config_from_hf(modern)
    assert (config.family, config.qk_norm, config.qkv_bias, config.head_dim) == ("sdar", False, True, 16)
    assert config.eos_token_id == 1 and config.rope_theta == 1e6
    assert hf_config.model_config_from_hf({**base, "model_type": "Dream"}).family == "dream"
    # overrides win; a qwen3 config without mask token gets the override
    no_mask = {k: v for k, v in base.items() if k != "mask_token_id"}
    assert hf_config.model_config_from_hf(no_mask, overrides={"mask_token_id": 7}).mask_token_id == 7


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mamba"}, "unknown model_type 'mamba'"),
    ({"model_type": "sdar_moe"}, "mixture-of-experts"),
    ({"hidden_size": None}, "field 'hidden_size': missing"),
    ({"num_attention_heads": "4"}, "field 'num_attention_heads': expected int"),
    ({"hidden_act": "gelu"}, "field 'hidden_act'"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn' is not supported"),
    ({"torch_dtype": "int8"}, "unsupported dtype 'int8'"),
    ({"mask_token_id": 100000}, "model.mask_token_id"),
    ({"attention_bias": True}, "field 'attention_bias'"),
])
def test_config_json_errors_name_file_and_field(tmp_path, change, message):
    data = {**hf_config.model_config_to_hf(TINY), **change}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(hf_keys.HFCheckpointError) as err:
        hf_config.read_hf_config(tmp_path)
    assert message in str(err.value)
    assert str(tmp_path / "config.json") in str(err.value)


# ------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family, dtype", [("sdar", "float32"), ("sdar", "bfloat16"),
                                           ("dream", "bfloat16"), ("llada", "float32")])
def test_export_import_round_trip_is_bit_exact(tmp_path, family, dtype):
    config = dataclasses.replace(FAMILIES[family], param_dtype=dtype, compute_dtype=dtype)
    params = random_params(config, seed=3)
    hf.save_hf_model((config, params), tmp_path / "out")
    model, loaded_config = hf.load_hf_model(tmp_path / "out")
    assert loaded_config == config
    assert_bit_equal(flat_numpy(params), flat_numpy(nnx.state(model, nnx.Param)))
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        expected_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
        assert all(f.get_slice(name).get_dtype() == ("BF16" if dtype == "bfloat16" else "F32") for name in f.keys())
        assert f.get_tensor(hf_keys.FAMILY_KEYS[family]["embed_tokens"]).dtype == expected_dtype
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["torch_dtype"] == dtype
    assert sorted(p.name for p in (tmp_path / "out").glob("*.py")) == sorted(hf.HF_CODE_FILES[family])


def test_export_casts_dtype_and_import_casts_back(tmp_path):
    params = random_params(TINY, seed=4)
    hf.save_hf_model((TINY, params), tmp_path / "bf16", dtype="bfloat16")
    model, config = hf.load_hf_model(tmp_path / "bf16", dtype="float32")
    assert config.param_dtype == "float32"
    ours = flat_numpy(params)
    back = flat_numpy(nnx.state(model, nnx.Param))
    for name in ours:
        np.testing.assert_array_equal(back[name], ours[name].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_sharded_files_and_index(sdar_dir):
    index = json.loads((sdar_dir / safetensors_io.INDEX_FILE).read_text())
    files = sorted(p.name for p in sdar_dir.glob("*.safetensors"))
    n = len(files)
    assert n > 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"].values()) == set(files)
    total = 0
    for name in files:
        tensors = load_file(sdar_dir / name)
        for key, value in tensors.items():
            assert index["weight_map"][key] == name
            total += value.nbytes
        largest = max(v.nbytes for v in tensors.values())
        assert sum(v.nbytes for v in tensors.values()) <= max(100_000, largest)
    assert total == index["metadata"]["total_size"] == TINY.num_params() * 4
    assert len(index["weight_map"]) == 3 + 11 * TINY.num_layers  # embed, norm, lm_head + 11 per layer


def test_sharded_load_places_parameters_in_their_shardings(sdar_dir, monkeypatch):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    unsharded, _ = hf.load_hf_model(sdar_dir)
    reads = []
    original = safetensors_io.SafetensorsDirectory.tensor_slice

    class Recorder:
        def __init__(self, name, inner):
            self.name, self.inner = name, inner

        def __getitem__(self, index):
            reads.append((self.name, index))
            return self.inner[index]

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    monkeypatch.setattr(safetensors_io.SafetensorsDirectory, "tensor_slice",
                        lambda self, name: Recorder(name, original(self, name)))
    model, config = hf.load_hf_model(sdar_dir, mesh=mesh, role="train")
    sharded_params = param_paths(nnx.state(model, nnx.Param))
    for path, value in flat_numpy(nnx.state(unsharded, nnx.Param)).items():
        array = sharded_params[path][...]
        assert array.sharding == param_sharding(path, value.shape, mesh, "train"), path
        np.testing.assert_array_equal(np.asarray(array), value)
    q_spec = sharded_params["layers.q_proj"][...].sharding.spec
    assert tuple(q_spec) == (None, "fsdp", "tensor", None)
    # each device shard of q_proj read a quarter of the torch tensor (rows: heads; columns: embed)
    q_reads = [index for name, index in reads if name == "model.layers.0.self_attn.q_proj.weight"]
    assert {(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in q_reads} == {(32, 32)}


# ------------------------------------------------------------------------- native checkpoints and CLI


def test_params_checkpoint_round_trip_with_mesh(tmp_path):
    config = dataclasses.replace(TINY, param_dtype="bfloat16", compute_dtype="bfloat16")
    params = random_params(config, seed=5)
    native.save_params_checkpoint(tmp_path / "ckpt", config, params)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    loaded_config, loaded = native.load_params_checkpoint(tmp_path / "ckpt", mesh=mesh)
    assert loaded_config == config
    assert_bit_equal(flat_numpy(params), flat_numpy(loaded))
    embed = param_paths(loaded)["embed_tokens"][...]
    assert embed.sharding == param_sharding("embed_tokens", embed.shape, mesh)
    with pytest.raises(CheckpointError, match="already exists"):
        native.save_params_checkpoint(tmp_path / "ckpt", config, params)
    with pytest.raises(CheckpointError, match="not a tradojax params checkpoint"):
        native.load_params_checkpoint(tmp_path)


def test_cli_import_then_export(sdar_dir, tmp_path, capsys):
    from tradojax.data.tokenizer import build_tiny_tokenizer, save_tokenizer

    tokenizer_dir = save_tokenizer(build_tiny_tokenizer(vocab_size=300), tmp_path / "tok")
    assert cli.main(["import-hf", str(sdar_dir), "--out", str(tmp_path / "ckpt")]) == 0
    printed = capsys.readouterr().out
    assert "family sdar" in printed and f"{TINY.num_params():,} parameters" in printed and "float32" in printed
    assert cli.main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "back"), "--tokenizer",
                     str(tokenizer_dir), "--dtype", "bfloat16", "--max-shard-size", "50KB"]) == 0
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    assert len(list((tmp_path / "back").glob("model-*.safetensors"))) > 3
    model, config = hf.load_hf_model(tmp_path / "back")
    assert config == dataclasses.replace(TINY, param_dtype="bfloat16", compute_dtype="bfloat16")
    original, _ = hf.load_hf_model(sdar_dir, dtype="bfloat16")
    assert_bit_equal(flat_numpy(nnx.state(original, nnx.Param)), flat_numpy(nnx.state(model, nnx.Param)))
    # exporting into a non-empty directory needs --overwrite
    assert cli.main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "back")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_cli_export_reads_a_hugging_face_directory_too(sdar_dir, tmp_path, capsys):
    assert cli.main(["export-hf", str(sdar_dir), str(tmp_path / "again"), "--dtype", "bfloat16"]) == 0
    again, config = hf.load_hf_model(tmp_path / "again")
    original, _ = hf.load_hf_model(sdar_dir, dtype="bfloat16")
    assert config.param_dtype == "bfloat16"
    assert_bit_equal(flat_numpy(nnx.state(original, nnx.Param)), flat_numpy(nnx.state(again, nnx.Param)))
    assert cli.main(["export-hf", str(sdar_dir), str(tmp_path / "other"), "--step", "3"]) == 2
    assert "a step (3) can only be chosen in a training run" in capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
    assert cli.main(["import-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert "tradojax import-hf: HFCheckpointError: " in err and str(tmp_path / "nope") in err and "no such checkpoint directory" in err
    assert not (tmp_path / "ckpt").exists()
    assert cli.main(["import-hf", str(tmp_path)]) == 2  # --out missing
    assert "--out" in capsys.readouterr().err
    assert cli.main(["export-hf", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["export-hf", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'empty'}: not a model" in err and "Hugging Face directory (config.json)" in err
    assert not (tmp_path / "out").exists()
    assert cli.main(["export-hf", "a", "b", "--max-shard-size", "lots"]) == 2
    assert "invalid size 'lots'" in capsys.readouterr().err


# ------------------------------------------------------------------------- bad checkpoints


@pytest.fixture
def single_dir(tmp_path):
    out = tmp_path / "single"
    hf.save_hf_model((TINY, random_params(TINY)), out)
    return out


def _error(path, **kwargs) -> str:
    with pytest.raises(hf_keys.HFCheckpointError) as err:
        hf.load_hf_model(path, **kwargs)
    return str(err.value)


def test_missing_config_json(single_dir):
    (single_dir / "config.json").unlink()
    message = _error(single_dir)
    assert "no config.json" in message and str(single_dir) in message


def test_missing_tensor(single_dir):
    file = single_dir / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    message = _error(single_dir)
    assert "'model.layers.1.mlp.up_proj.weight' not found" in message and "model.safetensors" in message


def test_wrong_shape(single_dir):
    file = single_dir / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.ones((64, 64), np.float32)
    save_file(tensors, file, metadata={"format": "pt"})
    message = _error(single_dir)
    assert "'model.layers.0.self_attn.k_proj.weight'" in message and str(file) in message
    assert "shape [64, 64], expected [32, 64]" in message and "kv_heads*head_dim" in message


def test_unknown_model_type(single_dir):
    data = json.loads((single_dir / "config.json").read_text())
    (single_dir / "config.json").write_text(json.dumps({**data, "model_type": "gpt2"}))
    message = _error(single_dir)
    assert "unknown model_type 'gpt2'" in message and str(single_dir / "config.json") in message


def test_truncated_safetensors(single_dir, sdar_dir, tmp_path):
    file = single_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    message = _error(single_dir)
    assert str(file) in message and "truncated or corrupt" in message
    # in a sharded checkpoint the error also names tensors the broken file holds
    sharded = tmp_path / "sharded"
    shutil.copytree(sdar_dir, sharded)
    index = json.loads((sharded / safetensors_io.INDEX_FILE).read_text())["weight_map"]
    broken = sorted(sharded.glob("model-00002-of-*.safetensors"))[0]
    held = [name for name, f in index.items() if f == broken.name]
    broken.write_bytes(broken.read_bytes()[:50])
    message = _error(sharded)
    assert str(broken) in message and held[0] in message


def test_index_pointing_to_missing_shard(sdar_dir, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(sdar_dir, sharded)
    gone = sorted(sharded.glob("model-00003-of-*.safetensors"))[0]
    index = json.loads((sharded / safetensors_io.INDEX_FILE).read_text())["weight_map"]
    held = sorted(name for name, f in index.items() if f == gone.name)
    gone.unlink()
    message = _error(sharded)
    assert str(sharded / safetensors_io.INDEX_FILE) in message and gone.name in message and "does not exist" in message
    assert any(name in message for name in held)
    # a tensor the index does not list is reported with the index it searched
    index = {k: v for k, v in index.items() if k != "lm_head.weight"}
    for name in held:
        index.pop(name)
    (sharded / safetensors_io.INDEX_FILE).write_text(json.dumps({"weight_map": index}))
    message = _error(sharded)
    assert "not found" in message and safetensors_io.INDEX_FILE in message
    assert any(f"'{name}'" in message for name in held + ["lm_head.weight"])


def test_no_safetensors_files(single_dir):
    (single_dir / "model.safetensors").rename(single_dir / "pytorch_model.bin")
    message = _error(single_dir)
    assert "no *.safetensors files" in message and "pytorch_model.bin" in message


def test_export_refuses_unrepresentable_models(tmp_path):
    qwen2_like = dataclasses.replace(TINY, qk_norm=False, qkv_bias=True)
    with pytest.raises(hf_keys.HFCheckpointError, match="SDAR form needs qk_norm=True"):
        hf.save_hf_model((qwen2_like, random_params(qwen2_like)), tmp_path / "out")
    with pytest.raises(CheckpointError, match="tokenizer directory does not exist"):
        hf.save_hf_model((TINY, random_params(TINY)), tmp_path / "out2", tokenizer=tmp_path / "none")
    assert not (tmp_path / "out2").exists()

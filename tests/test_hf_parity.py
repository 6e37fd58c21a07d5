"""Golden parity with `transformers` (torch, CPU, float32): tiny random checkpoints written by
`transformers` load into our decoder and give the same logits under the same 4-D masks; our SDAR
export loads back into `transformers` through our remote code with the same logits."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from tradojax.config import MeshConfig
from tradojax.models import hf, hf_keys
from tradojax.models.transformer import abstract_model, apply
from tradojax.ops import masks
from tradojax.parallel.mesh import make_mesh

# the `test` extra installs the CPU wheel; without torch the module is skipped (or: -m "not torch")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.torch

TOLERANCE = 1e-4  # max |logit difference| in float32 (logits are O(5))
SIZES = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
             tie_word_embeddings=False, eos_token_id=1, pad_token_id=0, bos_token_id=1)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights large enough that every parameter matters (norm weights around 1, biases non-zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)
    return model.eval()


def torch_logits(model, tokens, dense_mask, positions) -> np.ndarray:
    """Logits of a `transformers` model under our boolean mask given as a 4-D additive float mask."""
    additive = torch.zeros(dense_mask.shape, dtype=torch.float32)
    additive = additive.masked_fill(~torch.from_numpy(np.array(dense_mask)), float("-inf"))[:, None]
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(np.array(tokens)), attention_mask=additive,
                    position_ids=torch.from_numpy(np.array(positions, dtype=np.int64)))
    return out.logits.numpy()


def our_logits(model, tokens, positions, segments, rule=masks.MaskRule.BLOCK_DIFFUSION) -> np.ndarray:
    graphdef, params = nnx.split(model)
    return np.asarray(apply(graphdef, params, jnp.asarray(tokens), jnp.asarray(positions), segments, rule))


def inference_batch(batch=2, length=11, block_size=4, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 512, (batch, length)).astype(np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    segments = masks.inference_segments(jnp.asarray(positions), jnp.ones((batch, length), bool), block_size)
    dense = np.asarray(masks.dense_mask(masks.MaskRule.BLOCK_DIFFUSION, segments, segments, self_attention=True))
    return tokens, positions, segments, dense


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A tiny random Qwen3ForCausalLM saved by transformers, and our model loaded from it."""
    path = tmp_path_factory.mktemp("qwen3") / "hf"
    config = transformers.Qwen3Config(**SIZES, rope_theta=1e6, mask_token_id=3, block_size=4)
    reference = randomize(transformers.Qwen3ForCausalLM(config), seed=0)
    reference.config._attn_implementation = "eager"  # adds our 4-D float mask as given
    reference.save_pretrained(path)
    model, ours_config = hf.load_hf_model(path)
    return path, reference, model, ours_config


def test_qwen3_block_causal_inference_parity(qwen3):
    _, reference, model, config = qwen3
    assert (config.family, config.qk_norm, config.rope_theta, config.param_dtype) == ("sdar", True, 1e6, "float32")
    tokens, positions, segments, dense = inference_batch()
    assert not dense.all() and dense[0, 0, 3] and not dense[0, 0, 4]  # block-causal, blocks of 4
    ours = our_logits(model, tokens, positions, segments)
    ref = torch_logits(reference, tokens, dense, positions)
    diff = np.abs(ours - ref).max()
    print(f"qwen3 block-causal inference: max |logit diff| = {diff:.2e} (logits up to {np.abs(ref).max():.1f})")
    assert diff < TOLERANCE


@pytest.mark.parametrize("alignment", list(masks.BlockAlignment))
def test_qwen3_training_layout_left_padded_parity(qwen3, alignment):
    """`[prompt (left-padded) | clean | noisy]` rows with positions from training_segments."""
    _, reference, model, _ = qwen3
    prompt_valid = np.array([[False, False, False, True, True, True, True],
                             [True, True, True, True, True, True, True]])
    response_length = 8
    block, kind, valid, positions = masks.training_segments(prompt_valid, response_length, 4, alignment)
    rng = np.random.default_rng(1)
    tokens = rng.integers(4, 512, block.shape).astype(np.int32)
    tokens[:, :7][~prompt_valid] = 0  # pad id
    segments = masks.Segments(jnp.asarray(block), jnp.asarray(kind), jnp.asarray(valid))
    dense = np.asarray(masks.dense_mask(masks.MaskRule.BLOCK_DIFFUSION, segments, segments, self_attention=True))
    ours = our_logits(model, tokens, positions, segments)
    ref = torch_logits(reference, tokens, dense, positions)
    diff = np.abs(ours - ref).max()
    print(f"qwen3 training layout ({alignment.value}): max |logit diff| = {diff:.2e}")
    assert diff < TOLERANCE


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_exported_sdar_loads_in_transformers(qwen3, tmp_path, attn_implementation):
    _, reference, model, config = qwen3
    out = hf.save_hf_model(model, tmp_path / "sdar", max_shard_bytes=150_000)
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "sdar" and written["architectures"] == ["SDARForCausalLM"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, attn_implementation=attn_implementation).eval()
    assert type(loaded).__name__ == "SDARForCausalLM" and loaded.config.block_size == 4
    assert loaded.config.mask_token_id == 3 and loaded.dtype == torch.float32
    tokens, positions, segments, dense = inference_batch(seed=2)
    ours = our_logits(model, tokens, positions, segments)
    with torch.no_grad():  # SDAR's mask convention: boolean, True = visible; positions default to 0..T-1
        exported = loaded(input_ids=torch.from_numpy(tokens),
                          attention_mask=torch.from_numpy(dense.copy())[:, None]).logits.numpy()
        # without a mask SDAR attends bidirectionally (it never builds a causal mask itself)
        unmasked = loaded(input_ids=torch.from_numpy(tokens)).logits.numpy()
    full = masks.full_segments(jnp.ones(tokens.shape, bool))
    diff = np.abs(ours - exported).max()
    print(f"exported SDAR in transformers ({attn_implementation}): max |logit diff| = {diff:.2e}")
    assert diff < TOLERANCE
    assert np.abs(our_logits(model, tokens, positions, full, masks.MaskRule.FULL) - unmasked).max() < TOLERANCE
    # and the same weights as the original transformers checkpoint
    original = dict(reference.state_dict())
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_sharded_logits_match_unsharded(qwen3):
    path, _, model, _ = qwen3
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded, _ = hf.load_hf_model(path, mesh=mesh)
    tokens, positions, segments, _ = inference_batch(batch=4, seed=3)
    sharded_logits = our_logits(sharded, tokens, positions, segments)
    unsharded_logits = our_logits(model, tokens, positions, segments)
    print(f"sharded (2x2x2) vs unsharded: max |logit diff| = {np.abs(sharded_logits - unsharded_logits).max():.2e}")
    np.testing.assert_allclose(sharded_logits, unsharded_logits, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2") / "hf"
    sizes = {k: v for k, v in SIZES.items() if k != "head_dim"}  # Qwen2: head_dim = hidden / heads
    config = transformers.Qwen2Config(**sizes, rope_theta=1e4, mask_token_id=3)
    reference = randomize(transformers.Qwen2ForCausalLM(config), seed=4)
    reference.config._attn_implementation = "eager"
    reference.save_pretrained(path)
    return path, reference


def test_qwen2_with_qkv_bias_parity(qwen2):
    path, reference = qwen2
    model, config = hf.load_hf_model(path)
    assert (config.family, config.qk_norm, config.qkv_bias, config.rope_theta) == ("sdar", False, True, 1e4)
    tokens, positions, segments, dense = inference_batch(seed=5)
    diff = np.abs(our_logits(model, tokens, positions, segments) - torch_logits(reference, tokens, dense, positions)).max()
    print(f"qwen2 (q/k/v biases) block-causal: max |logit diff| = {diff:.2e}")
    assert diff < TOLERANCE


def test_dream_parity_full_attention(qwen2, tmp_path):
    """Dream checkpoints are Qwen2 tensors with model_type "Dream" and full attention."""
    path, reference = qwen2
    dream = tmp_path / "dream"
    dream.mkdir()
    for file in path.iterdir():
        (dream / file.name).write_bytes(file.read_bytes())
    data = json.loads((path / "config.json").read_text())
    (dream / "config.json").write_text(json.dumps({**data, "model_type": "Dream", "architectures": ["DreamModel"]}))
    model, config = hf.load_hf_model(dream)
    assert config.family == "dream" and config.logits_shifted and config.qkv_bias
    rng = np.random.default_rng(6)
    tokens = rng.integers(4, 512, (2, 9)).astype(np.int32)
    valid = np.ones((2, 9), bool)
    valid[0, :2] = False  # left pads: no query sees them
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    segments = masks.full_segments(jnp.asarray(valid))
    dense = np.asarray(masks.dense_mask(masks.MaskRule.FULL, segments, segments, self_attention=True))
    ours = our_logits(model, tokens, positions, segments, masks.MaskRule.FULL)
    diff = np.abs(ours - torch_logits(reference, tokens, dense, positions)).max()
    print(f"dream full attention with left pads: max |logit diff| = {diff:.2e}")
    assert diff < TOLERANCE


# Hugging Face Llama names -> LLaDA's (LLaDA is a Llama block with bidirectional attention).
LLAMA_TO_LLADA = {
    "model.embed_tokens.weight": "model.transformer.wte.weight",
    "model.norm.weight": "model.transformer.ln_f.weight",
    "lm_head.weight": "model.transformer.ff_out.weight",
    "self_attn.q_proj.weight": "q_proj.weight",
    "self_attn.k_proj.weight": "k_proj.weight",
    "self_attn.v_proj.weight": "v_proj.weight",
    "self_attn.o_proj.weight": "attn_out.weight",
    "mlp.gate_proj.weight": "ff_proj.weight",
    "mlp.up_proj.weight": "up_proj.weight",
    "mlp.down_proj.weight": "ff_out.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ff_norm.weight",
}


def test_llada_parity_against_llama_weights(tmp_path):
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=5e5,
        tie_word_embeddings=False)
    reference = randomize(transformers.LlamaForCausalLM(config), seed=7)
    reference.config._attn_implementation = "eager"
    tensors = {}
    for name, tensor in reference.state_dict().items():
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            tensors[f"model.transformer.blocks.{layer}.{LLAMA_TO_LLADA[rest]}"] = tensor.contiguous()
        else:
            tensors[LLAMA_TO_LLADA[name]] = tensor.contiguous()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": 64, "n_heads": 4, "n_kv_heads": 4,
        "n_layers": 2, "mlp_hidden_size": 96, "vocab_size": 500, "embedding_size": 512, "rope_theta": 5e5,
        "rms_norm_eps": 1e-5, "max_sequence_length": 256, "weight_tying": False, "block_type": "llama",
        "activation_type": "silu", "layer_norm_type": "rms", "rope": True, "mask_token_id": 5,
        "eos_token_id": 1, "pad_token_id": 1, "torch_dtype": "float32"}))
    model, ours_config = hf.load_hf_model(tmp_path)
    assert (ours_config.family, ours_config.vocab_size, ours_config.num_kv_heads) == ("llada", 512, 4)
    tokens = np.random.default_rng(8).integers(4, 512, (2, 10)).astype(np.int32)
    positions = np.broadcast_to(np.arange(10, dtype=np.int32), (2, 10))
    segments = masks.full_segments(jnp.ones((2, 10), bool))
    ours = our_logits(model, tokens, positions, segments, masks.MaskRule.FULL)
    diff = np.abs(ours - torch_logits(reference, tokens, np.ones((2, 10, 10), bool), positions)).max()
    print(f"llada (llama weights) full attention: max |logit diff| = {diff:.2e}")
    assert diff < TOLERANCE
    # and back: our LLaDA export has exactly the tensors we built
    out = hf.save_hf_model(model, tmp_path / "export")
    from safetensors.numpy import load_file

    exported = load_file(out / "model.safetensors")
    assert exported.keys() == tensors.keys()
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(exported[name], tensor.numpy())


# ------------------------------------------------------------------------- LLaDA and Dream exports

EXPORT_TOLERANCE = 1e-5  # max |logit difference| in float32 between our model and its export (logits O(3))


def padded_full_attention_batch(seed: int, batch=2, length=10):
    """Random tokens with left pads in row 0, their positions (counting real tokens) and segments."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 512, (batch, length)).astype(np.int32)
    valid = np.ones((batch, length), bool)
    valid[0, :3] = False
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    return tokens, valid, positions, masks.full_segments(jnp.asarray(valid))


@pytest.mark.parametrize("family, tied", [("llada", False), ("llada", True), ("dream", False)])
def test_exported_llada_and_dream_load_in_transformers(tmp_path, family, tied):
    """Our LLaDA (bidirectional, unshifted; output projection or tied embeddings) and Dream (q/k/v
    biases, shifted) exports load through their remote code with AutoModelForCausalLM and give our
    logits, with and without padding."""
    from test_hf import FAMILIES, random_params

    config = dataclasses.replace(FAMILIES[family], tie_word_embeddings=tied)
    model = nnx.merge(nnx.split(abstract_model(config))[0], random_params(config, seed=11))
    out = hf.save_hf_model(model, tmp_path / family)
    assert {"configuration_" + family + ".py", "modeling_" + family + ".py", "diffusion_attention.py"} <= {
        p.name for p in out.iterdir()}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(loaded).__name__ == {"llada": "LLaDAModelLM", "dream": "DreamModel"}[family]
    assert loaded.dtype == torch.float32 and loaded.config.mask_token_id == config.mask_token_id
    # every tensor we wrote was used: the remote code's names are the key table's
    assert set(loaded.state_dict()) >= {rule.name(layer) for rule in hf_keys.key_table(config)
                                        for layer in (range(config.num_layers) if rule.stacked else [None])}

    tokens, valid, positions, segments = padded_full_attention_batch(seed=12)
    ours = our_logits(model, tokens, positions, segments, masks.MaskRule.FULL)
    with torch.no_grad():
        padded = loaded(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(valid),
                        position_ids=torch.from_numpy(positions).long()).logits.numpy()
        unmasked = loaded(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
    diff = np.abs(ours - padded)[valid].max()  # pad rows attend nothing real: their logits are unused
    everything = masks.full_segments(jnp.ones(tokens.shape, bool))
    arange = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    unmasked_diff = np.abs(our_logits(model, tokens, arange, everything, masks.MaskRule.FULL) - unmasked).max()
    print(f"exported {family} in transformers: max |logit diff| = {diff:.2e} (padded), {unmasked_diff:.2e} "
          f"(no mask); logits up to {np.abs(ours).max():.1f}")
    assert diff < EXPORT_TOLERANCE and unmasked_diff < EXPORT_TOLERANCE
    assert np.abs(ours).max() > 1.0  # the weights matter


def test_value_model_export_matches_ours_and_reads_back(tmp_path):
    """A value model exports as the original saves one (backbone + value_head.weight [1, hidden]):
    transformers' final hidden states times the head give our values; it reads back bit-exact."""
    from test_hf import TINY, random_params

    from tradojax.models.value import value_model_from_policy

    policy = nnx.merge(nnx.split(abstract_model(TINY))[0], random_params(TINY, seed=13))
    value = value_model_from_policy(policy)
    value.value_head[...] = jnp.asarray(0.2 * np.random.default_rng(14).normal(size=TINY.hidden_size), jnp.float32)
    out = hf.save_hf_value_model(value, tmp_path / "value")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    from safetensors.numpy import load_file

    head = load_file(out / "model.safetensors")[hf.VALUE_HEAD]
    assert head.shape == (1, TINY.hidden_size)
    tokens, positions, segments, dense = inference_batch(seed=15)
    graphdef, state = nnx.split(value)
    ours = np.asarray(nnx.merge(graphdef, state)(jnp.asarray(tokens), jnp.asarray(positions), segments))
    with torch.no_grad():
        hidden = loaded.model(input_ids=torch.from_numpy(tokens).long(),
                              attention_mask=torch.from_numpy(dense.copy())[:, None]).last_hidden_state
    theirs = (hidden @ torch.from_numpy(head).T).squeeze(-1).numpy()
    diff = np.abs(ours - theirs).max()
    print(f"exported value model: max |value diff| = {diff:.2e} (values up to {np.abs(ours).max():.1f})")
    assert diff < EXPORT_TOLERANCE and np.abs(ours).max() > 0.1
    back = hf.load_hf_value_model(out)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(value)), nnx.to_flat_state(nnx.state(back))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))

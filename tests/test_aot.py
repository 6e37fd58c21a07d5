"""`tradojax aot`: the real TPU compiler (libtpu) on this CPU host.

A tiny model with head_dim 128 (the TPU kernels' lane width) on v5p:2x2x1 (mesh fsdp=4). The
analytic FLOPs are checked against counts written out by hand here.
"""

import json

import pytest

from tradojax import cli
from tradojax.config import load_config

TINY = ["--config=configs/tiny.py", "--config.model.head_dim=128", "--config.model.num_heads=2",
        "--config.model.num_kv_heads=1"]
TINY_OVERRIDES = ["model.head_dim=128", "model.num_heads=2", "model.num_kv_heads=1"]
# per layer: q (2 heads), k, v (1 kv head), o: 64 x 128 each; MLP 3 x 64 x 128; two layers
LAYER_WEIGHTS = 2 * (64 * (2 + 1 + 1) * 128 + 2 * 128 * 64 + 3 * 64 * 128)
HEAD_WEIGHTS = 64 * 512
ATTENTION_PER_PAIR = 4 * 2 * 2 * 128  # scores + values: 2 * head_dim each, per head per layer


def run(tmp_path, capsys, *args):
    out = tmp_path / "aot.json"
    assert cli.main(["aot", *TINY, "--topology", "v5p:2x2x1", *args, "--json", str(out)]) == 0
    return capsys.readouterr().out, {r["step"]: r for r in json.loads(out.read_text())}


def block_causal_pairs(length: int, block: int) -> int:
    """Visible (query, key) pairs of one full row: block k's queries see keys up to its end."""
    return sum(block * block * (k + 1) for k in range(length // block))


def test_aot_compiles_a_forward_for_v5p_and_reports_memory(tmp_path, capsys):
    printed, report = run(tmp_path, capsys, "--length", "256")
    assert "v5p:2x2x1: 4 devices" in printed and "attention=pallas" in printed  # the config's auto, as on TPU
    forward = report["forward"]
    config = load_config("configs/tiny.py", TINY_OVERRIDES)
    param_bytes = config.model.num_params() * 4
    # parameters are sharded over fsdp=4 (divisible dims only): between 1/4 and all of them per chip
    assert param_bytes / 4 <= forward["argument_bytes"] <= param_bytes + 4 * 256 * 4 * 2
    assert forward["fits"] and forward["temp_bytes"] > 0 and forward["batch"] == 4
    tokens = 4 * 256
    expected = 2 * (LAYER_WEIGHTS + HEAD_WEIGHTS) * tokens + ATTENTION_PER_PAIR * 4 * block_causal_pairs(256, 4)
    assert forward["flops_per_chip"] == pytest.approx(expected / 4)


def test_aot_rollout_prefill_and_decode_with_a_donated_sharded_cache(tmp_path, capsys):
    # 32 sequences = 8 prompts x 4 samples; prompt 60 -> bucket 64; 32 new tokens
    printed, report = run(tmp_path, capsys, "--steps", "rollout", "--batch", "32", "--samples-per-prompt", "4",
                          "--prompt-length", "60", "--response-length", "32")
    assert "32 sequences (4 per prompt), prompt bucket 64, 32 new tokens" in printed
    prefill, decode = report["rollout/prefill"], report["rollout/decode"]
    # slots: 64 prompt + 9 blocks of 4 = 100, rounded to 128 for the TPU decode kernel's tiles;
    # k and v, float32, [2 layers, 32 sequences / 4 chips, 128 slots, 1 kv head, 128]
    kv_per_chip = 2 * 2 * (32 // 4) * 128 * 1 * 128 * 4
    assert decode["alias_bytes"] == kv_per_chip  # the whole cache is updated in place
    assert kv_per_chip <= decode["output_bytes"] < kv_per_chip + 64 * 1024
    config = load_config("configs/tiny.py", TINY_OVERRIDES)
    # rollout parameters are whole on every chip (tensor=1) + the cache and the block state
    assert decode["argument_bytes"] >= kv_per_chip + config.model.num_params() * 4
    assert kv_per_chip <= prefill["output_bytes"] < kv_per_chip + 1024  # the broadcast per-sequence cache
    assert prefill["fits"] and decode["fits"]
    prefill_flops = 2 * LAYER_WEIGHTS * 8 * 64 + ATTENTION_PER_PAIR * 8 * block_causal_pairs(64, 4)
    assert prefill["flops_per_chip"] == pytest.approx(prefill_flops / 4)
    # each of 32 x 4 block tokens sees a cache of prompt + half the response + its block: 64 + 16 + 4
    decode_flops = 2 * (LAYER_WEIGHTS + HEAD_WEIGHTS) * 32 * 4 + ATTENTION_PER_PAIR * 32 * 4 * (64 + 16 + 4)
    assert decode["flops_per_chip"] == pytest.approx(decode_flops / 4)


def test_aot_policy_update_donates_params_and_adamw_state(tmp_path, capsys):
    printed, report = run(tmp_path, capsys, "--steps", "update", "--rows", "8", "--config.train.micro_batch_size=4",
                          "--prompt-length", "60", "--response-length", "32", "--attention", "reference")
    assert "update 8 rows (micro-batch 4) of 64 + 2 x 32" in printed
    update = report["update"]
    config = load_config("configs/tiny.py", TINY_OVERRIDES)
    state_bytes = 3 * config.model.num_params() * 4  # float32 params, AdamW mu and nu
    # params and optimizer state are donated and come back in place, sharded over fsdp=4
    assert state_bytes / 4 <= update["alias_bytes"] <= state_bytes
    assert update["alias_bytes"] <= update["argument_bytes"] < update["alias_bytes"] + 64 * 1024
    assert update["fits"] and update["temp_bytes"] > 0
    # dual-stream rows [64 prompt | 32 clean | 32 noisy], blocks of 4 aligned to the prompt start:
    # prompt block k sees 4(k+1) keys; clean block m sees the prompt and clean blocks <= m; noisy
    # block m sees the prompt, clean blocks < m and itself
    prompt_pairs = block_causal_pairs(64, 4)
    clean_pairs = sum(4 * (64 + 4 * (m + 1)) for m in range(8))
    noisy_pairs = sum(4 * (64 + 4 * m + 4) for m in range(8))
    pairs = 8 * (prompt_pairs + clean_pairs + noisy_pairs)
    forward = 2 * LAYER_WEIGHTS * 8 * 128 + 2 * HEAD_WEIGHTS * 8 * 32 + ATTENTION_PER_PAIR * pairs
    assert update["flops_per_chip"] == pytest.approx(3 * forward / 4)  # forward + backward, no remat


def test_aot_rejects_bad_topologies_and_shapes(capsys):
    with pytest.raises(ValueError, match="unknown TPU generation 'v9'"):
        cli.main(["aot", "--config=configs/tiny.py", "--topology", "v9:2x2"])
    with pytest.raises(ValueError, match="expected GENERATION:AxB"):
        cli.main(["aot", "--config=configs/tiny.py", "--topology", "v5p:big"])
    with pytest.raises(ValueError, match="--rows=6: must be a positive multiple of the micro-batch"):
        cli.main(["aot", *TINY, "--topology", "v5p:2x2x1", "--steps", "update", "--rows", "6",
                  "--config.train.micro_batch_size=4"])
    with pytest.raises(ValueError, match="--batch=20: must be prompts x samples per prompt"):
        cli.main(["aot", *TINY, "--topology", "v5p:2x2x1", "--steps", "rollout", "--batch", "20",
                  "--samples-per-prompt", "4"])
    with pytest.raises(SystemExit):
        cli.main(["aot", *TINY, "--topology", "v5p:2x2x1", "--steps", "forward,backward"])
    assert "unknown step 'backward'" in capsys.readouterr().err

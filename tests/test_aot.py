"""`tradojax aot`: the real TPU compiler (libtpu) on this CPU host."""

import json

import pytest

from tradojax import cli
from tradojax.config import load_config


def test_aot_compiles_a_forward_for_v5p_and_reports_memory(tmp_path, capsys):
    out = tmp_path / "aot.json"
    code = cli.main(["aot", "--config=configs/tiny.py", "--config.model.head_dim=128",
                     "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
                     "--topology", "v5p:2x2x1", "--length", "256", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "v5p:2x2x1: 4 devices" in printed and "forward" in printed
    report = json.loads(out.read_text())[0]
    config = load_config("configs/tiny.py", ["model.head_dim=128", "model.num_heads=2", "model.num_kv_heads=1"])
    param_bytes = config.model.num_params() * 4
    # parameters are sharded over fsdp=4 (divisible dims only): between 1/4 and all of them per chip
    assert param_bytes / 4 <= report["argument_bytes"] <= param_bytes + 4 * 256 * 4 * 2
    assert report["fits"] and report["temp_bytes"] > 0
    tokens_per_chip = 256  # batch 4 over 4 chips
    weight_flops = 2 * (config.model.num_params() - 512 * 64) * tokens_per_chip  # untied: lookup is free
    # scores + values over half the keys on average (block-causal): 4 * layers * heads * hd * T/2 per token
    attention_flops = 4 * 2 * 2 * 128 * 128 * tokens_per_chip
    assert report["flops_per_chip"] == pytest.approx(weight_flops + attention_flops)


def test_aot_rejects_unknown_topology(capsys):
    with pytest.raises(ValueError, match="unknown TPU generation 'v9'"):
        cli.main(["aot", "--config=configs/tiny.py", "--topology", "v9:2x2"])

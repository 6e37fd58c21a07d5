"""benchmarks/rollout.py keeps working: its --quick mode on a tiny model writes a complete result."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "rollout.py"


@pytest.mark.slow
def test_quick_rollout_benchmark_writes_every_case(tmp_path):
    spec = importlib.util.spec_from_file_location("rollout_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "rollout.json"
    assert module.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    cases = {(r["batch"], r["mode"]): r for r in report["results"]}
    assert {r["xla_options"] for r in report["results"]} == {"package"}
    assert set(cases) == {(1, "static"), (1, "dynamic"), (2, "static"), (2, "dynamic")}
    floors = report["floors"]
    assert floors["weight_read_seconds"] > 0 and floors["matmul_flops_per_second"] > 0
    for (batch, mode), r in cases.items():
        assert r["generated_tokens"] == batch * 16  # no early stop: every row writes all its tokens
        # static decoding commits one token per denoising step: at least one forward per token
        assert r["forwards_per_token"] >= (1.0 if mode == "static" else 0.25)
        assert r["tokens_per_second"] > 0 and 0 < r["share_of_weight_floor"] and 0 < r["share_of_matmul_floor"]
        assert len(r["runs"]) == report["repeats"] == 1
        # tiny decodes (at most 2 x 2b = 16 tokens per forward) compile with the small-CPU-decode options
        assert r["decode_xla_options"] == {"xla_cpu_experimental_ynn_fusion_type": ""}
        # fused-save forwards carry 2b tokens: the floor as run is above the b-token step floor
        assert 0 < r["fused_save_share_of_forwards"] <= 1
        assert r["matmul_floor_seconds_per_forward"] > r["step_matmul_floor_seconds_per_forward"] > 0

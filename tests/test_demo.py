"""`tradojax demo` at a reduced size: every artefact is written and is what it says."""

import json

import pytest

from tradojax import cli


@pytest.mark.slow
def test_demo_writes_every_artefact(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli.main(["demo", "--out", str(out), "--config.warm_start.steps=3", "--config.rl.steps=1",
                     "--config.data.synthetic_train_size=64", "--config.data.synthetic_eval_size=4",
                     "--config.rl.num_tasks_per_step=2", "--config.rl.num_responses_per_task=2",
                     "--config.eval.num_samples=1", "--config.rl.eval_every=1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and "after TraceRL" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    summary = metrics["summary"]
    assert summary["sft_steps"] == 3 and summary["rl_steps"] == 1 and summary["held_out_tasks"] == 4
    assert 0 <= summary["accuracy_after_sft"] <= 1 and 0 <= summary["accuracy_after_rl"] <= 1
    assert [m["step"] for m in metrics["sft"]] == [1, 2, 3] and len(metrics["rl"]) == 1
    # the in-loop eval after the last RL step and the final eval use the same tasks and seed
    final_eval = [v for k, v in metrics["rl"][-1].items() if k.endswith("/accuracy")]
    assert final_eval == [summary["accuracy_after_rl"]]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "trace.html").read_text()
    assert "<script" in page and "tradojax demo" in page
    hf_config = json.loads((out / "hf" / "config.json").read_text())
    assert hf_config["model_type"] == "sdar" and hf_config["block_size"] == 4
    assert list((out / "hf").glob("*.safetensors")) and (out / "hf" / "tokenizer.json").exists()
    # summary.json carries the printed table's figures, rounded as printed
    table = json.loads((out / "summary.json").read_text())
    assert table["accuracy"] == [round(summary["accuracy_after_sft"], 3), round(summary["accuracy_after_rl"], 3)]
    assert table["held_out_accuracy_at_rl_step"] == {"1": round(final_eval[0], 3)}
    assert len(table["rollout_reward"]) == 1


def test_readme_demo_table_is_the_recorded_run():
    """The quick-start table quotes benchmarks/results/demo.json (a recorded `tradojax demo`), figure for figure."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import demo_figures

    recorded = json.loads(demo_figures.RECORDED.read_text())
    readme = demo_figures.readme_table()
    assert demo_figures.differences(readme, recorded) == [], (readme, recorded)
    assert recorded["command"] == "tradojax demo" and len(recorded["rollout_reward"]) == recorded["rl_steps"]

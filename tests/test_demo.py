"""`tradojax demo` at a reduced size: every artefact is written and is what it says."""

import json

from tradojax import cli


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

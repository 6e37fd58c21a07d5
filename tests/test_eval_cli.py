"""`tradojax eval` end to end on the tiny model: synthetic tasks and a user's own data file."""

import json
import re

from tradojax import cli


def test_eval_on_synthetic_tasks_writes_results(tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = cli.main(["eval", "--config=configs/tiny.py", "--config.data.synthetic_eval_size=3",
                     "--config.data.synthetic_train_size=10", "--config.eval.num_samples=2",
                     "--config.sampling.max_new_tokens=8", "--config.rl.reward_workers=1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "low_confidence_dynamic" in printed and "low_confidence_static" in printed
    results = json.loads(out.read_text())["results"]
    assert [(r["strategy"], r["top_k"]) for r in results] == [("low_confidence_dynamic", 0), ("low_confidence_static", 1)]
    for r in results:
        assert r["num_tasks"] == 3 and r["num_samples"] == 2
        assert 0.0 <= r["accuracy"] <= r["pass_at_k"] <= 1.0
        assert 0 < r["mean_length"] <= 8 and r["tokens_per_step"] > 0


def test_eval_on_a_users_json_file(tmp_path):
    data = tmp_path / "my_math.json"
    data.write_text(json.dumps([{"question": "What is 2 + 2?", "ground_truth_answer": "4", "source": "mine"},
                                {"question": "What is 3 + 5?", "ground_truth_answer": "8"}]))
    out = tmp_path / "eval.json"
    code = cli.main(["eval", "--config=configs/tiny.py", "--data", str(data), "--responses",
                     "--config.eval.num_samples=1", "--config.sampling.max_new_tokens=8",
                     "--config.rl.reward_workers=1", "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())["results"]
    assert results[0]["num_tasks"] == 2 and len(results[0]["responses"]) == 2
    assert all("reason" in r for r in results[0]["responses"])


def test_eval_rejects_a_malformed_data_file(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "What is 1 + 1?", "ground_truth_answer": "2"}\n{"question": "no answer"}\n')
    code = cli.main(["eval", "--config=configs/tiny.py", "--data", str(data), "--out", str(tmp_path / "o.json")])
    assert code == 2
    assert re.search(r"bad\.jsonl.*line 2.*ground_truth_answer", capsys.readouterr().err)
    assert not (tmp_path / "o.json").exists()

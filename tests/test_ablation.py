"""benchmarks/ablation.py at a reduced size: every method runs from the same SFT model and the
table's numbers are the runs' own."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tradojax.config import Config, apply_overrides, from_dict
from tradojax.demo import default_config

_SPEC = importlib.util.spec_from_file_location("ablation", Path(__file__).resolve().parents[1] / "benchmarks" / "ablation.py")
ablation = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ablation)


def test_detrended_std_by_hand():
    # a line plus +-1 alternating residuals: the std around the least-squares line is ~1
    values = 0.3 * np.arange(8) + np.array([1, -1] * 4)
    residuals = values - np.polyval(np.polyfit(np.arange(8), values, 1), np.arange(8))
    assert ablation.detrended_std(values) == np.std(residuals)
    assert 0.9 < ablation.detrended_std(values) < 1.01
    assert ablation.detrended_std(np.array([0.2, 0.9])) == 0.0


@pytest.mark.slow
def test_reduced_ablation_runs_every_method_from_one_sft_model(tmp_path):
    config_dict = default_config()
    apply_overrides(config_dict, ["warm_start.steps=2", "warm_start.batch_size=8", "train.batch_size=8",
                                  "rl.steps=2", "rl.num_tasks_per_step=2", "rl.num_responses_per_task=2",
                                  "rl.difficulty_lower=0.0", "rl.difficulty_upper=1.0",
                                  "data.synthetic_train_size=16", "data.synthetic_eval_size=2",
                                  "eval.num_samples=1", "sampling.max_new_tokens=8"])
    methods = ["tracerl", "coupled"]
    result = ablation.run(from_dict(Config, config_dict), methods, [0], tmp_path, log=lambda line: None)
    assert [(r["method"], r["seed"]) for r in result["runs"]] == [("tracerl", 0), ("coupled", 0)]
    for run in result["runs"]:
        assert len(run["rewards"]) == 2
        assert run["accuracy_gain"] == run["held_out_accuracy"] - result["sft_accuracy"]["0"]
    # one start, one seed: the first step's rollouts (before any update) are the same for both
    assert result["runs"][0]["rewards"][0] == result["runs"][1]["rewards"][0]
    assert [row["method"] for row in result["table"]] == methods
    table = ablation.format_table(result)
    assert "coupled" in table and "SFT start" in table

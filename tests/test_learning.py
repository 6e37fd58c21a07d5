"""TraceRL learns: the demo's full run (fixed seed) raises held-out accuracy and rollout reward.

This is the README's claim, checked end to end on the built-in settings (about 3-4 minutes on 2
CPU cores): SFT leaves sampled answers right ~40% of the time; 20 TraceRL steps must move both the
rollout reward trend and the held-out accuracy up.
"""

import numpy as np
import pytest

from tradojax.config import Config, from_dict
from tradojax.demo import default_config, run_demo


@pytest.mark.slow
def test_tracerl_raises_reward_and_held_out_accuracy(tmp_path):
    config = from_dict(Config, default_config())
    summary = run_demo(config, tmp_path / "demo", log=lambda line: None)
    import json

    history = json.loads((tmp_path / "demo" / "metrics.json").read_text())["rl"]
    rewards = np.array([m["reward"] for m in history])
    assert len(rewards) == config.rl.steps
    # the trend: the last quarter of steps earns more than the first quarter
    quarter = len(rewards) // 4
    assert rewards[-quarter:].mean() > rewards[:quarter].mean() + 0.05, rewards.round(3).tolist()
    assert summary["accuracy_after_rl"] > summary["accuracy_after_sft"] + 0.05, summary
    # the trainer's recomputed log-probs stay the sampler's (inference-aligned trace rows)
    gaps = [m["sampler_trainer_logp_gap"] for m in history if "sampler_trainer_logp_gap" in m]
    assert gaps and max(gaps) < 0.01, gaps

"""The README's demo figures are the recorded run (the demo itself runs in test_learning.py)."""

import json


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

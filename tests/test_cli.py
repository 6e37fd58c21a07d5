"""The command line: help, unknown commands, and bad input answered with a message, not a traceback."""

import pytest

from tradojax import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    printed = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in printed


def test_unknown_command(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,field", [
    (["rl", "--config=configs/tiny.py", "--config.rl.method=grpo"], "rl.method"),
    (["rl", "--config=configs/tiny.py", "--config.rl.clip_eps=2"], "rl.clip_eps"),
    (["demo", "--config.train.stpes=3"], "train.stpes"),
    (["rl", "--config=configs/rl_tiny.py", "--config.warm_start.steps=0"], "warm_start.steps: must be >= 1"),
    (["eval", "--config=configs/tiny.py", "--config.eval.top_k=[0]"], "eval.top_k"),
    (["sample", "--config=configs/tiny.py", "--config.sampling.denoising_steps=9", "--prompt", "hi"],
     "sampling.denoising_steps"),
])
def test_bad_config_values_name_the_field(argv, field, capsys):
    assert cli.main(argv) == 2
    assert field in capsys.readouterr().err


def test_rl_with_a_missing_data_file(tmp_path, capsys):
    code = cli.main(["rl", "--config=configs/tiny.py", f"--config.data.train={tmp_path / 'nope.json'}",
                     "--workdir", str(tmp_path / "run")])
    assert code == 2
    assert "nope.json" in capsys.readouterr().err

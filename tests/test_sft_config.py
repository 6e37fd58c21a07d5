"""SFT options live in the config (`Config.sft`): `--config.sft.X=...` overrides, checks naming the
field, the family's default mode, and `tradojax sft`'s short flags as overrides of the same fields."""

import pytest
from helpers import config_path

from tradojax import cli
from tradojax.config import ConfigError, SFTConfig, load_config, to_dict


def test_sft_section_takes_overrides_and_resolves_the_mode_by_family():
    config = load_config(config_path("sft_tiny.py"), ["sft.mode=trace", "sft.shrink=2", "sft.eval_block_sizes=[4,8]",
                                                      "sft.buckets=multiple", "sft.bucket_multiple=32"])
    assert config.sft == SFTConfig(mode="trace", shrink=2, eval_block_sizes=(4, 8), buckets="multiple",
                                   bucket_multiple=32)
    assert to_dict(config)["sft"]["eval_block_sizes"] == [4, 8]
    default = load_config(config_path("sft_tiny.py")).sft
    assert default.mode == "auto"
    assert [default.for_family(f).mode for f in ("sdar", "llada", "dream")] == ["block", "random_masking", "semi_ar"]
    with pytest.raises(ConfigError, match="sft.shrink: must be >= 1, got 0"):
        load_config(config_path("sft_tiny.py"), ["sft.shrink=0"])
    with pytest.raises(ConfigError, match="sft.bogus: unknown field"):
        load_config(config_path("sft_tiny.py"), ["sft.bogus=1"])
    with pytest.raises(ConfigError, match="sft.mode: 'semi_ar' does not apply to model.family='sdar'"):
        SFTConfig(mode="semi_ar").for_family("sdar")


@pytest.mark.parametrize("flags,message", [
    (["--shrink", "0"], "sft.shrink: must be >= 1, got 0"),
    (["--config.sft.mode=semi_ar"], "sft.mode: 'semi_ar' does not apply to model.family='sdar'"),
    (["--config.sft.mode=trace", "--mode", "random_masking"],  # the short flag wins over the override
     "sft.mode: 'random_masking' does not apply to model.family='sdar'"),
])
def test_sft_command_flags_are_config_fields(flags, message, capsys, tmp_path):
    code = cli.main(["sft", "--config", config_path("sft_tiny.py"), "--synthetic", "4",
                     "--workdir", str(tmp_path), *flags])
    captured = capsys.readouterr()
    assert code == 2 and message in captured.err + captured.out
    assert not (tmp_path / "checkpoints").exists()  # refused before any work

"""The CLI is built from the config dataclasses and reports errors without a traceback."""

import pytest

from dylora_moe import ConfigError, DyLoRAMoEConfig
from dylora_moe.cli import build_parser, dataclass_from_args, main


def parse(*argv):
    return dataclass_from_args(DyLoRAMoEConfig, build_parser().parse_args(["report", "m", *argv]))


def test_options_map_to_typed_fields():
    cfg = parse("--num-experts", "8", "--alpha", "64", "--target-modules", "q_proj,v_proj", "--routing", "token")
    assert cfg.num_experts == 8 and cfg.alpha == 64.0
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.routing == "token"
    assert parse("--target-modules", "all-linear").target_modules == "all-linear"
    assert parse().num_experts == 4


def test_bad_values_name_the_option():
    with pytest.raises(ConfigError, match=r"--num-experts='four'"):
        parse("--num-experts", "four")
    with pytest.raises(ConfigError, match=r"top_k=9"):
        parse("--top-k", "9")


def test_main_prints_clear_error(capsys):
    assert main(["report", "smollm2-135m", "--top-k", "9"]) == 2
    err = capsys.readouterr().err
    assert "dylora-moe: error:" in err and "top_k=9" in err and "Traceback" not in err

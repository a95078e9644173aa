"""Config validation and JSON round trip; bad configs name the field."""

import json

import pytest

from dylora_moe import ConfigError, DyLoRAMoEConfig, DyLoRAMoEForCausalLM, TargetError
from tests.tiny import make_base


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"top_k": 5, "num_experts": 4}, r"top_k=5: is larger than num_experts=4"),
        ({"r": 0}, r"r=0: the LoRA rank must be an integer > 0"),
        ({"r": -3}, r"DyLoRAMoEConfig.r=-3"),
        ({"num_experts": 0}, r"num_experts=0"),
        ({"temperature": 0.0}, r"temperature"),
        ({"routing": "layer"}, r"routing='layer'"),
        ({"balance_loss": "l2"}, r"balance_loss='l2'"),
        ({"dropout": 1.0}, r"dropout"),
        ({"target_modules": []}, r"target_modules"),
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DyLoRAMoEConfig(**kwargs)


def test_unknown_target_module_is_a_clear_error():
    with pytest.raises(TargetError, match=r"'qkv' matches no nn.Linear/Conv1D .* available: .*q_proj"):
        DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(target_modules=["q_proj", "qkv"]))


def test_add_expert_rank_must_be_positive():
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig())
    with pytest.raises(ValueError, match="rank=0"):
        model.add_expert(rank=0)


def test_json_round_trip(tmp_path):
    cfg = DyLoRAMoEConfig(num_experts=3, r=8, alpha=16, routing="token", target_modules=["q_proj"])
    cfg.to_json_file(tmp_path / "c.json")
    assert DyLoRAMoEConfig.from_dict(json.loads((tmp_path / "c.json").read_text())) == cfg


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match=r"x.json: unknown DyLoRAMoEConfig field\(s\) \['lora_rank'\]"):
        DyLoRAMoEConfig.from_dict({"lora_rank": 8}, source="x.json")


def test_with_predating_values_fills_only_missing_fields_and_leaves_non_dicts_to_from_dict():
    from dylora_moe.config import PREDATING_VALUES, with_predating_values

    assert with_predating_values({"r": 4}) == {"r": 4, **PREDATING_VALUES}
    assert with_predating_values({"gate": "straight_through"})["gate"] == "straight_through"  # saved value wins
    assert with_predating_values([1, 2]) == [1, 2]
    with pytest.raises(ConfigError):
        DyLoRAMoEConfig.from_dict(with_predating_values([1, 2]), source="x.json")

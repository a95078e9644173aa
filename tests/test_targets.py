"""Target detection by architecture, explicit lists and errors."""

import pytest

from dylora_moe.targets import TargetError, find_targets
from tests.tiny import make_base


@pytest.mark.parametrize(
    "arch,attention,all_linear",
    [
        ("llama", {"q_proj", "k_proj", "v_proj", "o_proj"}, 7),
        ("qwen2", {"q_proj", "k_proj", "v_proj", "o_proj"}, 7),
        ("gemma", {"q_proj", "k_proj", "v_proj", "o_proj"}, 7),
        ("gpt2", {"c_attn", "c_proj"}, 4),
    ],
)
def test_presets(arch, attention, all_linear):
    model = make_base(arch)
    targets = find_targets(model, None)
    assert {t.name.rsplit(".", 1)[-1] for t in targets} == attention
    assert {t.layer_index for t in targets} == {0, 1}
    assert all(".mlp." not in t.name for t in targets)
    assert len(find_targets(model, "all-linear")) == 2 * all_linear


def test_explicit_suffix_and_full_path():
    model = make_base("gpt2")
    names = [t.name for t in find_targets(model, ["mlp.c_proj"])]
    assert names == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    assert [t.name for t in find_targets(model, ["transformer.h.1.attn.c_attn"])] == ["transformer.h.1.attn.c_attn"]


def test_lm_head_is_refused():
    with pytest.raises(TargetError, match="outside the decoder blocks"):
        find_targets(make_base("llama"), ["lm_head"])


def test_unknown_architecture_uses_structure():
    model = make_base("llama")
    model.config.model_type = "mystery"
    names = {t.name.rsplit(".", 1)[-1] for t in find_targets(model, "attention")}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj"}

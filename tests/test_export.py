"""export_expert gives a PEFT adapter reproducing the expert; merge_expert a plain model."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from tests.tiny import make_base, randomize_experts


def model_for(arch, **cfg):
    model = DyLoRAMoEForCausalLM(make_base(arch), DyLoRAMoEConfig(dropout=0.0, **cfg), mature=True)
    randomize_experts(model)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forced_expert_equals_peft_lora_with_same_weights(arch, batch):
    ids, mask, _ = batch
    model = model_for(arch, target_modules="all-linear")
    expert = 2
    peft_model = get_peft_model(
        make_base(arch),
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[t.name for t in model.targets],
                   fan_in_fan_out=arch == "gpt2"),
    )
    with torch.no_grad():
        for target, layer in zip(model.targets, model.expert_layers):
            peft_layer = peft_model.base_model.model.get_submodule(target.name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A[expert])
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B[expert])
    peft_model.eval()
    ours = model(input_ids=ids, attention_mask=mask, forced_expert=expert).logits
    theirs = peft_model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(ours, make_base(arch)(input_ids=ids, attention_mask=mask).logits, atol=1e-3)
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exported_adapter_loads_in_peft(arch, tmp_path, batch):
    ids, mask, _ = batch
    model = model_for(arch)
    model.add_expert(rank=8)
    randomize_experts(model, seed=4)
    for expert in (1, 4):
        out_dir = model.export_expert(expert, tmp_path / f"expert{expert}")
        assert (out_dir / "adapter_config.json").is_file() and (out_dir / "adapter_model.safetensors").is_file()
        peft_model = PeftModel.from_pretrained(make_base(arch), str(out_dir)).eval()
        assert peft_model.peft_config["default"].r == model.expert_ranks[expert]
        want = model(input_ids=ids, attention_mask=mask, forced_expert=expert).logits
        assert torch.allclose(peft_model(input_ids=ids, attention_mask=mask).logits, want, atol=1e-5)


@pytest.mark.exact
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_expert(arch, batch):
    ids, mask, _ = batch
    model = model_for(arch)
    before = model(input_ids=ids, attention_mask=mask).logits
    merged = model.merge_expert(3)
    assert isinstance(merged, PreTrainedModel)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    want = model(input_ids=ids, attention_mask=mask, forced_expert=3).logits
    assert torch.allclose(merged(input_ids=ids, attention_mask=mask).logits, want, atol=1e-5)
    # the wrapper is untouched
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_export_index_checked(tmp_path):
    with pytest.raises(IndexError, match="expert index 4 out of range"):
        model_for("llama").export_expert(4, tmp_path / "x")


def test_an_expert_exported_from_the_embedded_default_names_a_base_peft_can_load(tmp_path, batch, monkeypatch):
    """The alias 'smollm2-135m' means nothing to PEFT: the adapter names the converted local copy, so
    AutoPeftModelForCausalLM loads it offline (a tiny model stands in for the cached copy)."""
    from peft import AutoPeftModelForCausalLM

    from dylora_moe import loading
    from tests.tiny import make_tokenizer

    cached = tmp_path / "cache" / "smollm2"
    make_base("llama").save_pretrained(cached)
    make_tokenizer().save_pretrained(cached)
    monkeypatch.setattr(loading, "smollm2_path", lambda: cached)
    ids, mask, _ = batch
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(dropout=0.0), mature=True,
                                 base_name_or_path="smollm2-135m")
    randomize_experts(model)
    out_dir = model.export_expert(1, tmp_path / "expert1")
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(cached)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(out_dir)).eval()
    want = model(input_ids=ids, attention_mask=mask, forced_expert=1).logits
    assert torch.allclose(peft_model(input_ids=ids, attention_mask=mask).logits, want, atol=1e-5)


def test_merging_into_a_quantized_base_is_refused():
    model = model_for("llama")
    model.base_model.config.quantization_config = {"load_in_4bit": True}  # what bitsandbytes loading leaves
    with pytest.raises(ValueError, match="this base is quantized"):
        model.merge_expert(0)

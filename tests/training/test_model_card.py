"""The model card joint training writes into the final adapter (dylora_moe.training.model_card)."""

from __future__ import annotations

import json

import yaml

from dylora_moe import DyLoRAMoEForCausalLM
from dylora_moe.training import JointTrainer
from dylora_moe.training.model_card import model_card
from tests.tiny import make_base
from tests.training import isolate_data_registry, tiny_config, tiny_model_and_tokenizer, write_data_dir


def test_the_final_adapter_carries_a_model_card_with_the_runs_numbers(tmp_path, monkeypatch):
    isolate_data_registry(monkeypatch)
    config = tiny_config(tmp_path / "run", write_data_dir(tmp_path / "data"), **{"train.max_steps": 2})
    result = JointTrainer(config, *tiny_model_and_tokenizer()).train()
    card = (result.final_dir / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "dylora-moe" and "mixture-of-experts" in header["tags"]
    assert "base_model" not in header  # 'tiny-llama' is no Hub id
    metrics = json.loads(result.metrics_path.read_text())
    for name in ("code_alpaca", "mbpp"):  # the held-out loss per domain, before and after, from metrics.json
        start, end = metrics["eval_loss"]["start"][name], metrics["eval_loss"]["end"][name]
        assert f"| {name} | {start:.4f} | {end:.4f} | {end - start:+.4f} |" in card
        share = " | ".join(f"{s:.2f}" for s in metrics["expert_share"][name])
        assert f"| {name} | {share} |" in card
    assert "CC BY-NC 4.0" in card and "CC BY 4.0 (MBPP" in card  # the data's licences
    assert "2 optimizer steps of 8 sequences" in card and "lr 0.01" in card
    # saving the adapter again (learn-skill does) keeps the card
    model = DyLoRAMoEForCausalLM.from_pretrained(result.final_dir, base_model=make_base("llama"))
    model.save_pretrained(result.final_dir)
    assert (result.final_dir / "README.md").read_text() == card


def test_the_card_names_the_hub_base_and_unknown_licences(tmp_path):
    from dylora_moe.training import DatasetConfig

    config = tiny_config(tmp_path, tmp_path).replace(**{"model": "smollm2-135m"})
    config.data.datasets = [DatasetConfig("mine", path="mine.jsonl")]
    model = DyLoRAMoEForCausalLM(make_base("llama"), config.moe)
    card = model_card(config, {"global_step": 0}, model)
    assert yaml.safe_load(card.split("---")[1])["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "not recorded: state the licence of your data" in card and "No held-out evaluation" in card

"""save_pretrained / from_pretrained: bit-exact round trip, fingerprint and version checks."""

import json

import pytest
import torch

from dylora_moe import CheckpointError, DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.serialization import CONFIG_FILE, WEIGHTS_FILE
from tests.tiny import make_base, randomize_experts


def trained_model(routing="sequence"):
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(routing=routing, dropout=0.0), mature=True)
    randomize_experts(model)
    with torch.no_grad():
        for p in model.router_parameters():
            p.add_(0.1)
    return model


@pytest.mark.exact
@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_round_trip_is_bit_exact(tmp_path, batch, routing):
    ids, mask, _ = batch
    model = trained_model(routing)
    model.calibrate_router([{"input_ids": ids, "attention_mask": mask}])
    model.add_expert(rank=8)
    model.set_maturity(4, True)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    meta = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert meta["format_version"] == 1 and meta["expert_ranks"] == [16, 16, 16, 16, 8]
    loaded = DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=make_base("llama"))
    assert loaded.maturity == model.maturity and loaded.expert_ranks == model.expert_ranks
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                       loaded(input_ids=ids, attention_mask=mask).logits)


def test_overwrite_replaces_atomically(tmp_path):
    model = trained_model()
    model.save_pretrained(tmp_path / "ckpt")
    model.add_expert()
    model.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert len(meta["maturity"]) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_other_base_model_is_refused(tmp_path):
    trained_model().save_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="different configuration"):
        DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=make_base("qwen2"))
    with pytest.raises(CheckpointError, match="different weights"):
        DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=make_base("llama", seed=7))


def test_config_defaults_of_another_transformers_release_do_not_matter(tmp_path):
    """Only the architecture is compared: extra or changed non-architectural config keys still load."""
    model = trained_model()
    model.save_pretrained(tmp_path / "ckpt")
    base = make_base("llama")
    base.config.some_new_default_of_a_later_release = 42
    base.config.rope_theta = 12345.0
    loaded = DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=base)
    assert loaded.num_experts == model.num_experts
    wider = make_base("llama")
    wider.config.num_key_value_heads = 1
    with pytest.raises(CheckpointError, match=r"different configuration \(num_key_value_heads: \d+ vs 1\)"):
        DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=wider)


def test_checkpoints_without_recorded_architecture_still_load(tmp_path):
    trained_model().save_pretrained(tmp_path / "ckpt")
    cfg = tmp_path / "ckpt" / CONFIG_FILE
    meta = json.loads(cfg.read_text())
    del meta["base_model"]["architecture"]
    meta["base_model"]["config_sha256"] = "0" * 64  # written by an older release with other defaults
    cfg.write_text(json.dumps(meta))
    assert DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=make_base("llama")).num_experts
    with pytest.raises(CheckpointError, match="different configuration"):
        DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=make_base("qwen2"))


@pytest.mark.exact
def test_gate_round_trips_and_checkpoints_from_before_it_keep_the_probability_gate(tmp_path, batch):
    """The gate is saved with the config; a checkpoint written before the field existed was weighted by the
    router probability, and loads so (outputs equal to a probability-gated model), not with today's default."""
    ids, mask, _ = batch
    model = trained_model("token")
    assert model.moe_config.gate == "straight_through"  # the default since the quality study
    model.save_pretrained(tmp_path / "ckpt")
    loaded = DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=make_base("llama"))
    assert loaded.moe_config.gate == "straight_through"
    cfg = tmp_path / "ckpt" / CONFIG_FILE
    meta = json.loads(cfg.read_text())
    del meta["moe_config"]["gate"]
    cfg.write_text(json.dumps(meta))
    old = DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=make_base("llama"))
    assert old.moe_config.gate == "probability"
    model.moe_config.gate = "probability"
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(old(input_ids=ids, attention_mask=mask).logits, expected)
        assert not torch.allclose(loaded(input_ids=ids, attention_mask=mask).logits, expected)


def test_newer_format_and_malformed_files(tmp_path):
    trained_model().save_pretrained(tmp_path / "ckpt")
    cfg = tmp_path / "ckpt" / CONFIG_FILE
    meta = json.loads(cfg.read_text())
    meta["format_version"] = 99
    cfg.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version 99 was written by a newer dylora-moe"):
        DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=make_base("llama"))
    cfg.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"dylora_moe_config.json:1: malformed JSON"):
        DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=make_base("llama"))
    with pytest.raises(CheckpointError, match="not a DyLoRA-MoE checkpoint"):
        DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "nowhere", base_model=make_base("llama"))


def test_corrupt_weights(tmp_path):
    trained_model().save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=make_base("llama"))


def test_from_pretrained_returns_the_model_in_eval_mode(tmp_path, batch):
    """As transformers does: dropout is off after loading, so two forwards agree; .train() turns it back on."""
    ids, mask, _ = batch
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=2, r=4, alpha=8, dropout=0.5))
    for p in model.expert_parameters():
        torch.nn.init.normal_(p, std=0.5)  # B != 0, so the adapters (and their dropout) change the output
    model.train().save_pretrained(tmp_path / "ckpt")
    loaded = DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=make_base("llama"))
    assert not loaded.training and not any(m.training for m in loaded.modules())
    first, second = (loaded(input_ids=ids, attention_mask=mask).logits for _ in range(2))
    assert torch.equal(first, second)
    loaded.train()
    assert not torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, first)

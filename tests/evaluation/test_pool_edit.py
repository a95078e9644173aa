"""Pruning and merging experts of a checkpoint (dylora_moe.evaluation.pool_edit, dylora-moe prune / merge-experts)."""

from __future__ import annotations

import json

import pytest
import torch

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.cli import main
from dylora_moe.continual import SkillLibrary
from dylora_moe.errors import EvaluationError
from dylora_moe.evaluation.pool_edit import merge_checkpoint, prune_checkpoint, similar_groups
from tests.continual import A_WORDS, B_WORDS, skill_examples, write_skill_file
from tests.tiny import make_base, make_tokenizer, randomize_experts


@pytest.fixture
def setup(tmp_path):
    base = tmp_path / "base"
    make_base("llama").save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=4, r=4, alpha=8, dropout=0.0),
                                 mature=True, base_name_or_path=str(base))
    randomize_experts(model)
    library = SkillLibrary()
    library.add("sql", torch.zeros(64), 3, examples=8)                 # a skill that owns expert 3
    library.add("python", torch.ones(64), 1, examples=8, routing="kept")  # a domain of joint training
    model.skill_library = library
    model.save_pretrained(tmp_path / "ckpt")
    data = [str(write_skill_file(tmp_path / f"{n}.jsonl", skill_examples(w, 80, s))) for n, w, s in
            (("arith", A_WORDS, 0), ("lists", B_WORDS, 1))]
    return tmp_path, data


def test_prune_removes_experts_measures_and_writes_a_checkpoint_that_loads_exports_and_trains(setup):
    tmp_path, data = setup
    report = prune_checkpoint(tmp_path / "ckpt", data, tmp_path / "pruned", experts=[1], progress=False)
    assert (report.experts_before, report.experts_after) == (4, 3) and report.removed == [1]
    assert report.parameters_after < report.parameters_before and set(report.loss_after) == {"arith", "lists"}
    assert report.skills_moved == {"python": [1, 0]} and abs(sum(report.load_before) - 1) < 1e-6
    saved = json.loads((tmp_path / "pruned" / "pool_edit.json").read_text())
    assert saved["experts_after"] == 3
    model = DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "pruned")
    assert model.num_experts == 3
    assert {s.name: s.expert for s in model.skill_library.skills} == {"sql": 2, "python": 0}  # 3 -> 2, 1 -> 0
    model.export_expert(2, tmp_path / "sql-expert")
    model.train()
    out = model(**{k: v for k, v in make_tokenizer()(["add two numbers"], return_tensors="pt").items()
                   if k in ("input_ids", "attention_mask")}, labels=make_tokenizer()(
        ["add two numbers"], return_tensors="pt")["input_ids"])
    out.loss.backward()  # it trains on
    assert any(p.grad is not None for p in model.expert_parameters())


def test_prune_refuses_what_would_break_the_checkpoint(setup):
    tmp_path, data = setup
    with pytest.raises(EvaluationError, match="expert 3 holds skill 'sql'.*remap 3:<expert>"):
        prune_checkpoint(tmp_path / "ckpt", data, tmp_path / "x", experts=[3], progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(EvaluationError, match="would leave none"):
        prune_checkpoint(tmp_path / "ckpt", data, tmp_path / "x", min_load=1.1, progress=False)
    report = prune_checkpoint(tmp_path / "ckpt", data, tmp_path / "y", experts=[3], remap={3: 0}, progress=False)
    assert report.skills_moved == {"sql": [3, 0]}
    assert DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "y").skill_library.get("sql").expert == 0


def test_merge_by_similarity_or_groups_and_the_commands(setup, capsys):
    tmp_path, data = setup
    model = DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():  # make expert 2 nearly a copy of expert 0
        for layer in model.expert_layers:
            layer.lora_A[2].copy_(layer.lora_A[0] * 1.01)
            layer.lora_B[2].copy_(layer.lora_B[0])
    model.save_pretrained(tmp_path / "ckpt")
    report = merge_checkpoint(tmp_path / "ckpt", data, tmp_path / "merged", min_similarity=0.95, progress=False)
    assert report.groups == [[0, 2]] and report.experts_after == 3
    assert DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "merged").num_experts == 3
    assert main(["merge-experts", str(tmp_path / "ckpt"), "--data", *data, "--output", str(tmp_path / "m2"),
                 "--groups", "1+3", "--method", "ties", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "merge (ties): 4 -> 3 experts" in printed and "arith" in printed and "fewer" in printed
    assert main(["prune", str(tmp_path / "ckpt"), "--data", *data, "--output", str(tmp_path / "p2"),
                 "--experts", "3", "--no-progress"]) == 2
    assert "holds skill 'sql'" in capsys.readouterr().err
    assert main(["prune", str(tmp_path / "ckpt"), "--data", *data, "--output", str(tmp_path / "p3"),
                 "--remap", "3-0"]) == 2
    assert "--remap '3-0' must be OLD:NEW" in capsys.readouterr().err


def test_similar_groups_are_connected_components():
    sim = torch.tensor([[1.0, 0.9, 0.1, 0.0], [0.9, 1.0, 0.95, 0.0], [0.1, 0.95, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert similar_groups(sim, 0.8) == [[0, 1, 2]] and similar_groups(sim, 0.99) == []

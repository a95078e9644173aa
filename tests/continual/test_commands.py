"""``dylora-moe learn-skill`` and ``dylora-moe continual`` on a tiny model saved to disk."""

from __future__ import annotations

import json

import pytest

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.cli import main
from dylora_moe.continual.benchmark import forgetting_metrics
from tests.continual import A_WORDS, B_WORDS, THRESHOLD, skill_examples, write_skill_file
from tests.tiny import make_base, make_tokenizer

FAST = ["seed_steps=2", "consolidate_steps=2", "batch_size=4", "max_seq_length=64", "embed_examples=16",
        "replay_per_skill=4", f"threshold={THRESHOLD}", "seed_lr=0.01"]


@pytest.fixture
def checkpoint(tmp_path):
    base = make_base("llama")
    base.save_pretrained(tmp_path / "base")
    make_tokenizer().save_pretrained(tmp_path / "base")
    model = DyLoRAMoEForCausalLM(base, DyLoRAMoEConfig(num_experts=1, r=4, alpha=8),
                                 base_name_or_path=str(tmp_path / "base"))
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def files_of(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_learn_skill_command_grows_and_saves_the_library(checkpoint, tmp_path, capsys):
    a = write_skill_file(tmp_path / "a.jsonl", skill_examples(A_WORDS, 24, 0))
    b = write_skill_file(tmp_path / "b.jsonl", skill_examples(B_WORDS, 24, 1))
    args = ["--device", "cpu", "--no-progress", *FAST]
    assert main(["learn-skill", str(checkpoint), "--data", str(a), "--name", "arith", *args]) == 0
    assert "skill 'arith' is novel (the library is empty): expert 0" in capsys.readouterr().out
    assert main(["learn-skill", str(checkpoint), "--data", str(b), "--name", "lists", *args]) == 0
    out = capsys.readouterr().out
    assert "skill 'lists' is novel" in out and "expert 1" in out and "lists -> expert 1" in out
    meta = json.loads((checkpoint / "skill_library.json").read_text())
    assert [s["name"] for s in meta["skills"]] == ["arith", "lists"]
    config = json.loads((checkpoint / "dylora_moe_config.json").read_text())
    assert config["maturity"] == [True, True]
    held = write_skill_file(tmp_path / "held.jsonl", skill_examples(A_WORDS, 12, 9))
    assert main(["learn-skill", str(checkpoint), "--data", str(held), "--name", "more", *args]) == 0
    assert "matches skill 'arith'" in capsys.readouterr().out


@pytest.mark.parametrize("content,message", [
    ('{"instruction": "add two", "output": "a + b"}\n{not json\n', "bad.jsonl:2"),
    ('{"instruction": "add two", "answer": "a + b"}\n', "output"),
    ("", "empty file"),
])
def test_learn_skill_on_a_bad_file_fails_clearly_and_leaves_the_checkpoint(checkpoint, tmp_path, capsys,
                                                                           content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    before = files_of(checkpoint)
    code = main(["learn-skill", str(checkpoint), "--data", str(bad), "--name", "x", "--device", "cpu", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dylora-moe: error: ") and message in err and "Traceback" not in err
    assert files_of(checkpoint) == before


def test_learn_skill_rejects_bad_settings(checkpoint, tmp_path, capsys):
    a = write_skill_file(tmp_path / "a.jsonl", skill_examples(A_WORDS, 8, 0))
    code = main(["learn-skill", str(checkpoint), "--data", str(a), "--name", "x", "protection=magic"])
    err = capsys.readouterr().err
    assert code == 2 and "'protection' must be one of" in err


def test_continual_benchmark_writes_the_forgetting_matrix(checkpoint, tmp_path, capsys):
    stages = []
    for name, words, seed in (("arith", A_WORDS, 0), ("lists", B_WORDS, 1)):
        stages.append(str(write_skill_file(tmp_path / f"{name}.jsonl", skill_examples(words, 80, seed))))
    out = tmp_path / "cont"
    code = main(["continual", "--no-progress", f"model={tmp_path / 'base'}", f"stages=[{','.join(stages)}]",
                 f"output_dir={out}", "rank=4", "eval_examples=8", "detector_batches=2", "detector_batch_size=8",
                 "protections=[none]", *[f"continual.{o}" for o in FAST]])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "continual.json").read_text())
    assert set(report["methods"]) == {"dylora", "dylora_none", "baseline"}
    dylora = report["methods"]["dylora"]
    assert len(dylora["loss"]) == 2 and len(dylora["loss"][0]) == 2
    assert dylora["num_experts"] == 2 and [s["created"] for s in dylora["stages"]] == [True, True]
    assert dylora["detector"]["tp"] + dylora["detector"]["fn"] == 2  # the new skill's batches
    assert dylora["detector"]["tn"] + dylora["detector"]["fp"] == 2  # the known skill's held-out batches
    assert set(report["max_forgetting"]) == {"dylora", "dylora_none", "baseline"}
    assert (out / "continual.png").stat().st_size > 0
    assert "max forgetting" in capsys.readouterr().out


def test_continual_benchmark_keeps_the_router_settings_it_was_measured_with(checkpoint, tmp_path):
    """`dylora-moe continual` builds its models with sequence routing, temperature 2 and the probability gate
    (what docs/continual.md measured), whatever the joint-training defaults are."""
    from dylora_moe.continual.benchmark import ContinualRunConfig, _fresh_model

    model, _ = _fresh_model(ContinualRunConfig(model=str(tmp_path / "base"), rank=4), mature=True)
    cfg = model.moe_config
    assert (cfg.routing, cfg.temperature, cfg.gate) == ("sequence", 2.0, "probability")
    assert DyLoRAMoEConfig().gate == "straight_through"  # differs from the joint-training default


def test_forgetting_metrics():
    m = [[1.0, 5.0, 5.0], [1.1, 2.0, 5.0], [1.05, 2.1, 3.0]]
    f = forgetting_metrics(m)
    assert f["max_forgetting"] == pytest.approx(0.10)  # skill 0 rose 10% after stage 1
    assert f["average_forgetting"] == pytest.approx((0.05 + 0.05) / 2)
    assert f["backward_transfer"] == pytest.approx(((1.0 - 1.05) + (2.0 - 2.1)) / 2)
    assert forgetting_metrics([[1.0]])["max_forgetting"] is None

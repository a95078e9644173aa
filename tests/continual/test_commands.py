"""``dylora-moe learn-skill`` and ``dylora-moe continual`` on a tiny model saved to disk."""

from __future__ import annotations

import json

import pytest

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.cli import main
from tests.continual import A_WORDS, B_WORDS, skill_examples, write_skill_file
from tests.tiny import make_base, make_tokenizer

FAST = ["seed_steps=2", "consolidate_steps=2", "batch_size=4", "max_seq_length=64", "embed_examples=16",
        "replay_per_skill=4", "seed_lr=0.01"]  # the default detector: standardized similarity, threshold 0.8


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


def test_continual_benchmark_runs_every_method_in_every_order_and_resumes(checkpoint, tmp_path, capsys):
    stages = []
    for name, words, seed in (("arith", A_WORDS, 0), ("lists", B_WORDS, 1)):
        stages.append(str(write_skill_file(tmp_path / f"{name}.jsonl", skill_examples(words, 80, seed))))
    out = tmp_path / "cont"
    args = ["continual", "--no-progress", f"model={tmp_path / 'base'}", f"stages=[{','.join(stages)}]",
            "orders=[[0,1],[1,0]]", f"output_dir={out}", "rank=4", "eval_examples=8", "detector_batches=2",
            "detector_batch_size=8", "protections=[none]", *[f"continual.{o}" for o in FAST]]
    code = main(args)
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "continual.json").read_text())
    assert report["format_version"] == 2 and report["skills"] == ["arith", "lists"]
    sequential = ["dylora", "sequential_lora", "replay_lora", "olora", "dylora_none"]
    assert set(report["units"]) == {f"{m}-order{k}" for m in sequential for k in (0, 1)}
    assert set(report["bounds"]) == {"multitask_lora", "oracle"}
    for key, unit in report["units"].items():
        assert len(unit["loss"]) == 2 and len(unit["loss"][0]) == 2, key
        assert unit["skills"] == (["arith", "lists"] if key.endswith("0") else ["lists", "arith"])
        assert set(unit["metrics"]) == {"ap", "bwt", "ft", "fwt", "max_forgetting"}
        assert unit["metrics"]["ap"] == pytest.approx(sum(unit["loss"][-1]) / 2)
    dylora = report["units"]["dylora-order1"]
    assert dylora["num_experts"] == 2 and [s["created"] for s in dylora["stages"]] == [True, True]
    assert dylora["detector"]["tp"] + dylora["detector"]["fn"] == 2  # the new skill's batches
    assert dylora["detector"]["tn"] + dylora["detector"]["fp"] == 2  # the known skill's held-out batches
    assert dylora["detector"]["similarity"] == "standardized"
    assert set(dylora["routing_accuracy"]) == {"arith", "lists", "mean"}
    assert report["units"]["olora-order0"]["orthogonality"][0] == 0.0
    assert set(report["bounds"]["oracle"]["final"]) == {"arith", "lists"}
    assert report["summary"]["dylora"]["orders"] == 2 and "multitask_lora" in report["summary"]
    assert {"met", "detector_precision", "ahead_of_olora"} <= set(report["bar"])
    assert (out / "continual.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "AP" in printed and "BWT" in printed and "routing accuracy" in printed
    # a second run resumes from the finished units: nothing is trained again, the report is the same
    written = {p.name: p.read_bytes() for p in (out / "units").iterdir()}
    assert main(args) == 0
    assert "sequential_lora-order1: done before" in capsys.readouterr().out.replace("unit ", "")
    assert {p.name: p.read_bytes() for p in (out / "units").iterdir()} == written
    assert json.loads((out / "continual.json").read_text())["units"] == report["units"]


def test_continual_benchmark_rejects_a_bad_order(checkpoint, tmp_path, capsys):
    code = main(["continual", "--no-progress", f"model={tmp_path / 'base'}", "stages=[a.jsonl,b.jsonl]",
                 "orders=[[0,0]]", f"output_dir={tmp_path / 'x'}"])
    err = capsys.readouterr().err
    assert code == 2 and "orders[0]" in err and "permutation" in err
    code = main(["continual", "--no-progress", "methods=[dylora,ewc]", f"output_dir={tmp_path / 'x'}"])
    assert code == 2 and "ewc" in capsys.readouterr().err


def test_continual_benchmark_keeps_the_router_settings_it_was_measured_with(checkpoint, tmp_path):
    """`dylora-moe continual` builds its models with sequence routing, temperature 2 and the probability gate
    (what docs/continual.md measured), whatever the joint-training defaults are."""
    from dylora_moe.continual.config import ContinualRunConfig
    from dylora_moe.study.continual_baselines import lora_model

    model, _ = lora_model(ContinualRunConfig(model=str(tmp_path / "base"), rank=4), 4)
    cfg = model.moe_config
    assert (cfg.routing, cfg.temperature, cfg.gate) == ("sequence", 2.0, "probability")
    assert DyLoRAMoEConfig().gate == "straight_through"  # differs from the joint-training default


@pytest.mark.parametrize("path", ["configs/continual.yaml", "configs/continual-five.yaml"])
def test_the_shipped_continual_configs_are_valid(path):
    from pathlib import Path

    import yaml

    from dylora_moe.common.configs import build_config
    from dylora_moe.continual.config import METHODS, ContinualRunConfig

    source = Path(__file__).resolve().parents[2] / path
    run = build_config(ContinualRunConfig, yaml.safe_load(source.read_text()), str(source), [])
    run.validate(str(source))
    assert run.active_methods() == list(METHODS)
    assert run.continual.threshold is None and run.continual.similarity == "standardized"
    if path.endswith("five.yaml"):  # the benchmark of issue #29: five skills, one not code, three orders
        assert len(run.stages) == 5 and "asdiv" in run.stages and run.exact_match == ["asdiv"]
        assert len(run.task_orders()) == 3 and run.eval_examples >= 100

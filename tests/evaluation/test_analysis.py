"""Routing specialisation analysis: the NMI function, and ``analyze`` with a tiny model (JSON + PNG)."""

from __future__ import annotations

import json
import math

import pytest

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.data import Example
from dylora_moe.evaluation.analysis import analyze, entropy, normalized_mutual_information
from dylora_moe.evaluation.commands import main
from tests.tiny import make_base, randomize_experts

try:  # the tiny tokenizer lives in tests/tiny.py (it used to live in tests/data/conftest.py)
    from tests.tiny import make_tokenizer
except ImportError:  # pragma: no cover
    from tests.data.conftest import make_tokenizer


# ----------------------------------------------------------------------------- NMI
def test_nmi_is_one_for_perfectly_domain_aligned_routing():
    domains = ["sql"] * 5 + ["py"] * 7 + ["js"] * 3
    experts = [2] * 5 + [0] * 7 + [1] * 3
    assert normalized_mutual_information(domains, experts) == pytest.approx(1.0)
    assert normalized_mutual_information(experts, domains) == pytest.approx(1.0)  # symmetric


def test_nmi_is_zero_for_independent_routing():
    # every domain spreads over the experts in the same proportions: independent
    domains = ["a"] * 6 + ["b"] * 6
    experts = [0, 0, 1, 1, 2, 2] * 2
    assert normalized_mutual_information(domains, experts) == pytest.approx(0.0, abs=1e-12)
    assert normalized_mutual_information(domains, [0] * 12) == 0.0  # everything to one expert


def test_nmi_partial_and_edge_cases():
    domains = ["a"] * 4 + ["b"] * 4
    experts = [0, 0, 0, 1, 1, 1, 1, 0]
    value = normalized_mutual_information(domains, experts)
    # I = ln 2 - H(3/4, 1/4); H(D) = H(E) = ln 2
    expected = (math.log(2) - entropy([0.75, 0.25])) / math.log(2)
    assert value == pytest.approx(expected) and 0 < value < 1
    assert normalized_mutual_information(["a"] * 3, [1] * 3) == 1.0  # both constant
    with pytest.raises(ValueError):
        normalized_mutual_information([1, 2], [1])
    with pytest.raises(ValueError):
        normalized_mutual_information([], [])


def test_entropy():
    assert entropy([1.0, 0.0]) == 0.0
    assert entropy([0.25] * 4) == pytest.approx(math.log(4))


# ----------------------------------------------------------------------------- analyze
def _domains() -> dict[str, list[Example]]:
    words = {"alpha": "add two numbers return a + b", "beta": "sort the list print hello world"}
    return {name: [Example(name, f"{text} {i}", "", f"def f ( ) : {i}") for i in range(6)]
            for name, text in words.items()}


def _model(num_experts: int = 3) -> DyLoRAMoEForCausalLM:
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=num_experts, r=4, alpha=8),
                                 mature=True)
    randomize_experts(model)
    return model.eval()


def test_analyze_writes_json_and_heatmaps(tmp_path):
    report = analyze(_model(), _domains(), tokenizer=make_tokenizer(), output_dir=tmp_path, batch_size=4,
                     progress=False)
    assert report == json.loads((tmp_path / "analysis.json").read_text())
    for png in ("expert_share.png", "router_probs.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["domain_names"] == ["alpha", "beta"] and report["num_experts"] == 3
    for name in ("alpha", "beta"):
        domain = report["domains"][name]
        assert domain["examples"] == 6 and domain["tokens"] > 0 and domain["loss"] > 0
        assert sum(domain["expert_share"]) == pytest.approx(1.0) and sum(domain["counts"]) == 6
        assert sum(domain["mean_router_probs"]) == pytest.approx(1.0, abs=1e-5)
        assert 0 <= domain["router_entropy"] <= math.log(3) + 1e-6
    assert len(report["share_matrix"]) == 2 and len(report["share_matrix"][0]) == 3
    assert 0.0 <= report["nmi"] <= 1.0
    assert sum(report["expert_load"]) == pytest.approx(1.0) and report["max_entropy"] == pytest.approx(math.log(3))


def test_analyze_of_a_forced_single_expert_model_has_zero_nmi(tmp_path):
    """One expert gets everything: the chosen expert carries no information about the domain."""
    report = analyze(_model(num_experts=1), _domains(), tokenizer=make_tokenizer(), output_dir=tmp_path,
                     progress=False)
    assert report["nmi"] == 0.0 and report["expert_load"] == [1.0] and report["router_entropy"] == 0.0


def test_analyze_needs_a_moe_model(tmp_path):
    with pytest.raises(ValueError, match="DyLoRA-MoE"):
        analyze(make_base("llama"), _domains(), tokenizer=make_tokenizer(), output_dir=tmp_path, progress=False)


def test_analyze_command_with_a_checkpoint_and_data_files(tmp_path, capsys):
    base = make_base("llama")
    base.save_pretrained(tmp_path / "base")
    make_tokenizer().save_pretrained(tmp_path / "base")
    model = DyLoRAMoEForCausalLM(base, DyLoRAMoEConfig(num_experts=2, r=4, alpha=8), mature=True,
                                 base_name_or_path=str(tmp_path / "base"))
    model.save_pretrained(tmp_path / "ckpt")
    for name, examples in _domains().items():
        records = [{"instruction": ex.instruction, "input": "", "output": ex.output} for ex in examples]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code = main(["analyze", str(tmp_path / "ckpt"), "--data", str(tmp_path / "alpha.jsonl"),
                 str(tmp_path / "beta.jsonl"), "--split", "all", "--output", str(tmp_path / "out"), "--no-progress"])
    assert code == 0
    assert "NMI(domain; expert)" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert report["domain_names"] == ["alpha", "beta"] and report["domains"]["alpha"]["examples"] == 6

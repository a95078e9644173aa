"""Routing specialisation analysis: the NMI function, and ``analyze`` with a tiny model (JSON + PNG)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.cli import main
from dylora_moe.data import Example
from dylora_moe.evaluation.analysis import analyze, entropy, nmi_from_joint, normalized_mutual_information
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


def test_nmi_from_a_joint_table_matches_the_labelled_items():
    domains = ["a"] * 4 + ["b"] * 4 + ["c"] * 2
    experts = [0, 0, 0, 1, 1, 1, 1, 0, 2, 2]
    counts = [[3, 1, 0], [1, 3, 0], [0, 0, 2]]
    assert nmi_from_joint(counts) == pytest.approx(normalized_mutual_information(domains, experts))
    probs = [[w / 10 for w in row] for row in counts]  # scale does not matter
    assert nmi_from_joint(probs) == pytest.approx(nmi_from_joint(counts))
    assert nmi_from_joint([[0.5, 0.0], [0.0, 0.5]]) == pytest.approx(1.0)
    assert nmi_from_joint([[0.25, 0.25], [0.25, 0.25]]) == pytest.approx(0.0, abs=1e-12)
    for bad in ([[0.0, 0.0]], [[1.0, -0.5]], []):
        with pytest.raises(ValueError, match="joint table"):
            nmi_from_joint(bad)


def test_entropy():
    assert entropy([1.0, 0.0]) == 0.0
    assert entropy([0.25] * 4) == pytest.approx(math.log(4))


# ----------------------------------------------------------------------------- analyze
def _domains() -> dict[str, list[Example]]:
    words = {"alpha": "add two numbers return a + b", "beta": "sort the list print hello world"}
    return {name: [Example(name, f"{text} {i}", "", f"def f ( ) : {i}") for i in range(6)]
            for name, text in words.items()}


def _model(num_experts: int = 3, routing: str = "token") -> DyLoRAMoEForCausalLM:
    model = DyLoRAMoEForCausalLM(make_base("llama"),
                                 DyLoRAMoEConfig(num_experts=num_experts, r=4, alpha=8, routing=routing), mature=True)
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


def _flat(matrix: list[list[float]]) -> list[float]:
    return [x for row in matrix for x in row]


def test_per_decision_view_equals_the_per_example_view_with_sequence_routing(tmp_path):
    """One routing decision per example: both views must agree exactly."""
    report = analyze(_model(routing="sequence"), _domains(), tokenizer=make_tokenizer(), output_dir=tmp_path,
                     batch_size=4, progress=False)
    assert report["routing_unit"] == "sequence" and not (tmp_path / "decision_share.png").exists()
    for name in ("alpha", "beta"):
        assert report["domains"][name]["decisions"] == 6
    assert _flat(report["decision_share_matrix"]) == pytest.approx(_flat(report["share_matrix"]))
    assert report["decision_nmi"] == pytest.approx(report["nmi"])
    assert report["decision_entropy"] == pytest.approx(report["router_entropy"], rel=1e-5)


def test_per_decision_view_counts_every_token_decision_with_token_routing(tmp_path):
    """With token routing, the decision shares are the argmax of every router over every real token, counted
    independently here through hooks on the routers; padding (batch 4 pads) must not count."""
    model = _model(routing="token").train()
    with torch.no_grad():
        for router in model.routers:
            for p in router.parameters():
                p.normal_(0.0, 2.0)  # decisive routers: the per-token choices vary within an example
    model.eval()
    captured: list[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda mod, args, out: captured.append(out.detach().argmax(-1)))
             for r in model.routers]
    try:
        single = analyze(model, _domains(), tokenizer=make_tokenizer(), output_dir=tmp_path / "one",
                         batch_size=1, progress=False)  # batch 1: no padding, every position is a real token
    finally:
        for h in hooks:
            h.remove()
    half = len(captured) // 2  # 6 examples per domain, in domain order
    expected = []
    for chunk in (captured[:half], captured[half:]):
        choices = torch.cat([c.reshape(-1) for c in chunk])
        expected.append([float((choices == e).sum()) / choices.numel() for e in range(3)])
    assert single["routing_unit"] == "token" and (tmp_path / "one" / "decision_share.png").is_file()
    assert _flat(single["decision_share_matrix"]) == pytest.approx(_flat(expected), abs=1e-6)
    tokens = {name: sum(c.shape[-1] for c in chunk[:: len(model.routers)])
              for name, chunk in zip(("alpha", "beta"), (captured[:half], captured[half:]))}
    assert {n: single["domains"][n]["decisions"] for n in tokens} == tokens
    joint = [[share * single["domains"][n]["decisions"] for share in row]
             for n, row in zip(("alpha", "beta"), expected)]
    assert single["decision_nmi"] == pytest.approx(nmi_from_joint(joint))
    assert 0.0 < single["decision_entropy"] < math.log(3)
    assert _flat(single["decision_share_matrix"]) != pytest.approx(_flat(single["share_matrix"]))  # views differ
    padded = analyze(model, _domains(), tokenizer=make_tokenizer(), output_dir=tmp_path / "four", batch_size=4,
                     progress=False)
    assert _flat(padded["decision_share_matrix"]) == pytest.approx(_flat(single["decision_share_matrix"]), abs=1e-5)
    assert [padded["domains"][n]["decisions"] for n in tokens] == list(tokens.values())


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

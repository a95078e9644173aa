"""The generation journal: an evaluation cut short resumes with the same samples, and refuses a foreign journal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.cli import main
from dylora_moe.evaluation import SandboxLimits, harness
from dylora_moe.evaluation.generation import Sample
from dylora_moe.evaluation.harness import EvaluationError, evaluate
from dylora_moe.evaluation.journal import JOURNAL_FILE, GenerationJournal, JournalError, model_fingerprint
from tests.tiny import make_base, make_tokenizer, randomize_experts

LIMITS = SandboxLimits(timeout_s=20.0)
# sampled, several samples per problem, several batches: the case where resuming could change the samples
SETTINGS = dict(benchmark="humaneval", limit=4, n_samples=2, temperature=1.0, max_new_tokens=6, batch_size=3,
                workers=2, limits=LIMITS, progress=False)


@pytest.fixture(scope="module")
def moe():
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=3, r=4, alpha=8), mature=True)
    randomize_experts(model)
    return model.eval()


class Interrupt(Exception):
    pass


def interrupt_after(monkeypatch, batches: int) -> None:
    """Journal ``batches`` batches, then stop the run as Ctrl-C would (after the batch was journaled)."""
    real = GenerationJournal.append
    calls = []

    def append(self, samples):
        real(self, samples)
        calls.append(len(samples))
        if len(calls) == batches:
            raise Interrupt

    monkeypatch.setattr(GenerationJournal, "append", append)


def count_generate_calls(monkeypatch, model) -> list[int]:
    calls: list[int] = []
    real = model.generate

    def generate(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    return calls


def rows(folder):
    return [{k: v for k, v in json.loads(line).items() if k != "duration_s"}
            for line in (folder / "results.jsonl").read_text().splitlines()]


def test_an_interrupted_run_resumes_with_the_same_samples(moe, tmp_path, monkeypatch):
    tokenizer = make_tokenizer()
    whole = evaluate(moe, tokenizer, output_dir=tmp_path / "whole", **SETTINGS)
    assert whole["resumed_samples"] == 0 and not (tmp_path / "whole" / JOURNAL_FILE).exists()

    cut = tmp_path / "cut"
    with monkeypatch.context() as patch:
        interrupt_after(patch, batches=2)
        with pytest.raises(Interrupt):
            evaluate(moe, tokenizer, output_dir=cut, **SETTINGS)
    assert not (cut / "results.jsonl").exists() and not (cut / "summary.json").exists()
    lines = (cut / JOURNAL_FILE).read_text().splitlines()
    assert len(lines) == 3 and sum(len(json.loads(line)["samples"]) for line in lines[1:]) == 6

    calls = count_generate_calls(monkeypatch, moe)
    resumed = evaluate(moe, tokenizer, output_dir=cut, **SETTINGS)
    assert calls == [2]  # 8 samples in batches of 3, 3, 2: only the last batch is generated again
    assert resumed["resumed_samples"] == 6
    assert rows(cut) == rows(tmp_path / "whole")  # sampled replies, routing, statuses: all as uninterrupted
    assert resumed["pass@k"] == whole["pass@k"] and resumed["outcomes"] == whole["outcomes"]
    assert not (cut / JOURNAL_FILE).exists()


def test_a_journal_from_another_evaluation_is_refused_and_no_resume_discards_it(moe, tmp_path, monkeypatch):
    tokenizer = make_tokenizer()
    with monkeypatch.context() as patch:
        interrupt_after(patch, batches=1)
        with pytest.raises(Interrupt):
            evaluate(moe, tokenizer, output_dir=tmp_path, **SETTINGS)
    journal = (tmp_path / JOURNAL_FILE).read_text()
    with pytest.raises(EvaluationError, match=r"generation\.partial\.jsonl: was written by a different evaluation "
                                              r"\(seed: 0 there, 1 now\).*--no-resume"):
        evaluate(moe, tokenizer, output_dir=tmp_path, **{**SETTINGS, "seed": 1})
    other = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=3, r=4, alpha=8), mature=True)
    randomize_experts(other, seed=2)
    with pytest.raises(EvaluationError, match=r"\(model: "):
        evaluate(other.eval(), tokenizer, output_dir=tmp_path, **SETTINGS)
    assert (tmp_path / JOURNAL_FILE).read_text() == journal  # a refused journal is left as it was

    calls = count_generate_calls(monkeypatch, moe)
    summary = evaluate(moe, tokenizer, output_dir=tmp_path, resume=False, **{**SETTINGS, "seed": 1})
    assert summary["resumed_samples"] == 0 and calls == [3, 3, 2]
    assert not (tmp_path / JOURNAL_FILE).exists()


def sample(task: str, index: int) -> Sample:
    return Sample(task, index, "prompt", "completion", "solution", 3, 1, [0.25, 0.75])


def test_a_line_cut_off_by_the_interruption_is_dropped(tmp_path):
    path = tmp_path / JOURNAL_FILE
    journal = GenerationJournal(path, {"seed": 0})
    assert journal.open() == {}
    journal.append([sample("T/0", 0), sample("T/0", 1)])
    journal.close()
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"samples": [{"task_id": "T/1", "ind')  # a batch half written when killed
    again = GenerationJournal(path, {"seed": 0})
    done = again.open()
    assert sorted(done) == [("T/0", 0), ("T/0", 1)] and done[("T/0", 1)] == sample("T/0", 1)
    assert path.read_bytes() == whole  # the cut-off line is gone, the next batch appends after a newline
    again.append([sample("T/1", 0)])
    again.close()
    assert sorted(GenerationJournal(path, {"seed": 0}).open()) == [("T/0", 0), ("T/0", 1), ("T/1", 0)]


@pytest.mark.parametrize("content, message", [
    ('{"journal": 1, "fingerprint": {"seed": 0}}\nnot json\n{"samples": []}\n', "line 2 is not valid JSON"),
    ('{"journal": 1, "fingerprint": {"seed": 0}}\n{"samples": [{"task_id": "T/0"}]}\n', r"line 2 lacks field"),
    ('{"results": []}\n', "line 1 is not a version-1 generation journal header"),
])
def test_a_damaged_journal_names_the_line(tmp_path, content, message):
    path = tmp_path / JOURNAL_FILE
    path.write_text(content)
    with pytest.raises(JournalError, match=message):
        GenerationJournal(path, {"seed": 0}).open()
    assert path.read_text() == content
    assert GenerationJournal(path, {"seed": 0}).open(resume=False) == {}  # --no-resume starts over


def test_model_fingerprint_follows_the_weights_not_the_object():
    one = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=2, r=4, alpha=8), mature=True)
    randomize_experts(one)
    two = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=2, r=4, alpha=8), mature=True)
    two.load_state_dict(one.state_dict())
    assert model_fingerprint(one) == model_fingerprint(two)
    with torch.no_grad():
        two.expert_layers[0].lora_B[1][0, 0] += 0.01  # one weight of one expert
    assert model_fingerprint(one) != model_fingerprint(two)
    assert model_fingerprint(one) != model_fingerprint(one.to(torch.bfloat16))


def test_eval_command_no_resume(moe, tmp_path, monkeypatch, capsys):
    """``--no-resume`` reaches ``evaluate``; a resumed run says how many samples it kept."""
    seen = []

    def fake(*, config):
        seen.append(config.resume)
        return {"benchmark": "humaneval", "problems": 1, "pass@k": {"pass@1": 0.0}, "outcomes": {"failed": 1},
                "experts": None, "resumed_samples": 0 if not config.resume else 5}

    monkeypatch.setattr(harness, "evaluate", fake)
    assert main(["eval", "ckpt", "--output", str(tmp_path), "--no-progress", "--no-resume"]) == 0
    assert "resumed" not in capsys.readouterr().out
    assert main(["eval", "ckpt", "--output", str(tmp_path), "--no-progress"]) == 0
    assert "resumed: 5 samples" in capsys.readouterr().out
    assert seen == [False, True]


def test_eval_command_interrupted_says_how_to_resume(tmp_path, monkeypatch, capsys):
    def interrupted(*args, output_dir, **kwargs):
        journal = GenerationJournal(output_dir / JOURNAL_FILE, {"seed": 0})
        journal.open()
        journal.append([sample("T/0", 0)])
        journal.append([sample("T/1", 0)])
        journal.close()
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "evaluate", lambda *, config: interrupted(output_dir=Path(config.output)))
    assert main(["eval", "ckpt", "--output", str(tmp_path), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert f"2 generated batch(es) are kept in {tmp_path / JOURNAL_FILE}: run the same command again" in err
    assert "dylora-moe: interrupted" in err


def test_a_finished_folder_is_not_generated_again_another_evaluation_is_refused_and_overwrite_replaces(
        moe, tmp_path, monkeypatch):
    tokenizer = make_tokenizer()
    first = evaluate(moe, tokenizer, output_dir=tmp_path, **SETTINGS)
    results = (tmp_path / "results.jsonl").read_bytes()
    calls = count_generate_calls(monkeypatch, moe)
    again = evaluate(moe, tokenizer, output_dir=tmp_path, **SETTINGS)
    assert calls == [] and again == first  # the same evaluation, finished: nothing regenerated
    assert (tmp_path / "results.jsonl").read_bytes() == results
    with pytest.raises(EvaluationError, match=r"already holds a finished evaluation .*\(seed: 0 there, 1 now\).*"
                                              r"--overwrite"):
        evaluate(moe, tokenizer, output_dir=tmp_path, **{**SETTINGS, "seed": 1})
    assert (tmp_path / "results.jsonl").read_bytes() == results  # refused: left as it was
    old = json.loads((tmp_path / "summary.json").read_text())
    old.pop("fingerprint")  # a summary written before summaries kept their fingerprint
    (tmp_path / "summary.json").write_text(json.dumps(old))
    with pytest.raises(EvaluationError, match="did not record what it ran"):
        evaluate(moe, tokenizer, output_dir=tmp_path, **SETTINGS)
    replaced = evaluate(moe, tokenizer, output_dir=tmp_path, overwrite=True, **{**SETTINGS, "seed": 1})
    assert calls == [3, 3, 2] and replaced["seed"] == 1 and replaced["fingerprint"]["seed"] == 1


def test_generation_reports_every_decoding_step_with_the_batches_left(moe):
    from dylora_moe.evaluation.benchmarks import load_problems
    from dylora_moe.evaluation.generation import GenerationConfig, generate_samples

    steps: list[tuple[int, int]] = []
    generate_samples(moe, make_tokenizer(), load_problems("humaneval", limit=4),
                     GenerationConfig(max_new_tokens=5, batch_size=2), on_token=lambda s, batches_left: steps.append(
                         (s, batches_left)))
    assert steps[0] == (1, 2) and (1, 1) in steps  # a new batch starts at step 1; two batches, then one left
    assert all(1 <= s <= 5 for s, _ in steps) and max(s for s, _ in steps) >= 2
    assert [s for s, left in steps if left == 2] == list(range(1, len([1 for _, left in steps if left == 2]) + 1))

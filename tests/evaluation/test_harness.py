"""``evaluate`` end to end with a tiny random model and the real sandbox, and the ``eval`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.cli import main, parse_arguments
from dylora_moe.cli.evaluation_commands import AnalyzeOptions
from dylora_moe.cli.options import config_from_options
from dylora_moe.evaluation import SandboxLimits, harness
from dylora_moe.evaluation.benchmarks import load_problems
from dylora_moe.evaluation.config import EvalConfig
from dylora_moe.evaluation.generation import Sample
from dylora_moe.evaluation.harness import EvaluationError, evaluate
from dylora_moe.sandbox import STATUSES
from tests.tiny import make_base, randomize_experts

try:  # the tiny tokenizer lives in tests/tiny.py (it used to live in tests/data/conftest.py)
    from tests.tiny import make_tokenizer
except ImportError:  # pragma: no cover
    from tests.data.conftest import make_tokenizer

ROW_FIELDS = {"task_id", "sample", "prompt", "completion", "solution", "status", "reason", "expert", "router_probs",
              "new_tokens", "duration_s"}
LIMITS = SandboxLimits(timeout_s=20.0)


def read_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def moe():
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=3, r=4, alpha=8), mature=True)
    randomize_experts(model)
    return model.eval()


def test_evaluate_writes_consistent_results_and_summary(moe, tmp_path):
    summary = evaluate(moe, make_tokenizer(), benchmark="humaneval", limit=2, n_samples=2, temperature=1.0, k="1,2,5",
                       max_new_tokens=6, batch_size=3, output_dir=tmp_path, workers=2, limits=LIMITS, progress=False)
    rows = read_rows(tmp_path)
    assert len(rows) == 4 and all(set(r) == ROW_FIELDS for r in rows)
    assert [(r["task_id"], r["sample"]) for r in rows] == [
        ("HumanEval/0", 0), ("HumanEval/0", 1), ("HumanEval/1", 0), ("HumanEval/1", 1)]
    assert all(r["status"] in STATUSES and r["reason"] for r in rows)
    assert all("def check(candidate)" not in r["completion"] for r in rows)  # no program stored
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert sum(summary["outcomes"].values()) == 4 and set(summary["outcomes"]) == set(STATUSES)
    assert set(summary["pass@k"]) == {"pass@1", "pass@2", "pass@5"} and summary["pass@k"]["pass@5"] is None
    passed = sum(r["status"] == "passed" for r in rows)
    assert summary["pass@k"]["pass@1"] == pytest.approx(passed / 4) and summary["outcomes"]["passed"] == passed
    assert summary["prompt_style"] == "completion" and summary["problems"] == 2 and summary["mode"] == "model"
    # the router's choice is recorded per sample, identical across samples of one prompt
    assert all(isinstance(r["expert"], int) and 0 <= r["expert"] < 3 for r in rows)
    assert rows[0]["expert"] == rows[1]["expert"] and rows[0]["router_probs"] == rows[1]["router_probs"]
    assert sum(e["problems"] for e in summary["experts"].values()) == 2


def test_base_model_has_no_experts(tmp_path):
    summary = evaluate(make_base("llama"), make_tokenizer(), benchmark="humaneval", limit=1, max_new_tokens=4,
                       output_dir=tmp_path, limits=LIMITS, progress=False)
    [row] = read_rows(tmp_path)
    assert row["expert"] is None and row["router_probs"] is None and summary["experts"] is None


def test_pass_at_1_counts_real_passes(monkeypatch, tmp_path):
    """Scripted generation: the canonical solution for one problem, a 'pass' body for the other."""
    problems = load_problems("humaneval", limit=2)
    canonical = problems[0].reference[len(problems[0].prompt):]

    def fake_generate(model, tokenizer, problems, config, on_batch=None, done=None, on_token=None):
        samples = [Sample(p.task_id, 0, p.prompt, c, p.prompt + c, 3, expert=i, router_probs=[0.5, 0.5])
                   for i, (p, c) in enumerate(zip(problems, [canonical, "    pass\n"]))]
        on_batch(samples)
        return samples

    monkeypatch.setattr(harness, "generate_samples", fake_generate)
    summary = evaluate(make_base("llama"), make_tokenizer(), benchmark="humaneval", limit=2, output_dir=tmp_path,
                       limits=LIMITS, progress=False)
    assert summary["pass@k"]["pass@1"] == 0.5 and summary["problems_solved"] == 1
    assert summary["outcomes"]["passed"] == 1 and summary["outcomes"]["failed"] == 1
    assert summary["experts"] == {"0": {"problems": 1, "pass@1": 1.0}, "1": {"problems": 1, "pass@1": 0.0}}
    assert [r["status"] for r in read_rows(tmp_path)] == ["passed", "failed"]


def test_references_mode(tmp_path):
    summary = evaluate(None, benchmark="humaneval", limit=3, references=True, output_dir=tmp_path, limits=LIMITS,
                       progress=False)
    refs = summary["references"]
    assert refs["passed"] == 3 and refs["pass_body"]["passed"] == 0 and summary["mode"] == "references"
    assert len(read_rows(tmp_path)) == 6


def test_invalid_settings(tmp_path):
    with pytest.raises(EvaluationError, match="greedy"):
        evaluate(make_base("llama"), make_tokenizer(), limit=1, n_samples=2, output_dir=tmp_path, progress=False)
    with pytest.raises(EvaluationError, match="k must"):
        evaluate(make_base("llama"), make_tokenizer(), limit=1, k="1,x", output_dir=tmp_path, progress=False)
    with pytest.raises(EvaluationError, match="not a DyLoRA-MoE checkpoint"):
        evaluate(str(tmp_path), limit=1, output_dir=tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, moe):
    """A real checkpoint folder whose base model is a local folder (tiny llama + tiny tokenizer)."""
    root = tmp_path_factory.mktemp("ckpt")
    base = make_base("llama")
    base.save_pretrained(root / "base")
    make_tokenizer().save_pretrained(root / "base")
    model = DyLoRAMoEForCausalLM(base, DyLoRAMoEConfig(num_experts=2, r=4, alpha=8), mature=True,
                                 base_name_or_path=str(root / "base"))
    randomize_experts(model)
    model.save_pretrained(root / "ckpt")
    return root / "ckpt"


def test_eval_command_with_a_checkpoint(checkpoint, tmp_path, capsys):
    out = tmp_path / "he"
    code = main(["eval", str(checkpoint), "--benchmark", "humaneval", "--limit", "1", "--max-new-tokens", "4",
                 "--output", str(out), "--no-progress", "--workers", "1", "--dtype", "bfloat16", "--device", "cpu"])
    assert code == 0
    assert "pass@1 = " in capsys.readouterr().out
    [row] = read_rows(out)
    assert row["expert"] in (0, 1)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == str(checkpoint)
    assert (summary["device"], summary["dtype"]) == ("cpu", "bfloat16")


def test_device_and_dtype_resolution():
    import torch

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert harness.resolve_device("auto").type == expected and harness.resolve_device(None).type == expected
    assert harness.resolve_device("cpu") == torch.device("cpu")
    assert harness.resolve_dtype(None) is torch.float32 and harness.resolve_dtype("bf16") is torch.bfloat16
    with pytest.raises(EvaluationError, match="dtype must be one of"):
        harness.resolve_dtype("int3")
    with pytest.raises(EvaluationError, match="device must be"):
        harness.resolve_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(EvaluationError, match="no CUDA device"):
            harness.resolve_device("cuda")


def test_eval_command_references(tmp_path, capsys):
    assert main(["eval", "--references", "--limit", "2", "--output", str(tmp_path), "--no-progress"]) == 0
    assert "references: 2/2 pass; 'pass' bodies: 0/2 pass" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["eval"], "MODEL is required"),
    (["eval", "{tmp}", "--limit", "1"], "not a DyLoRA-MoE checkpoint"),
    (["eval", "{tmp}", "--n-samples", "3", "--limit", "1"], "greedy"),
    (["eval", "x", "--benchmark", "mbpp", "--data-dir", "{tmp}/missing"], "does not exist"),
    (["eval", "x", "--base-only", "--limit", "1", "--device", "tpu:7"], "device must be"),
    (["analyze", "{tmp}", "--data", "mbpp", "--output", "{tmp}/a"], "not a DyLoRA-MoE checkpoint"),
])
def test_command_errors_exit_2_without_traceback(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default output folder (eval/<benchmark>) would go
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dylora-moe: error: ") and message in err and "Traceback" not in err
    # a rejected command leaves no output folder behind
    assert not (tmp_path / "eval").exists() and not (tmp_path / "a").exists()


def test_eval_options_build_the_eval_config():
    ns = parse_arguments(["eval", "ckpt", "--benchmark", "mbpp", "--k", "1,10", "--n-samples", "10",
                                    "--temperature", "0.8", "--base-only", "--workers", "2", "--timeout", "5",
                                    "--task-ids", "MBPP/2", "MBPP/3", "--no-resume", "seed=7"])
    config = config_from_options(EvalConfig, ns)
    assert config == EvalConfig(model="ckpt", benchmark="mbpp", k="1,10", n_samples=10, temperature=0.8,
                                base_only=True, workers=2, timeout_s=5.0, task_ids=["MBPP/2", "MBPP/3"],
                                resume=False, seed=7)
    assert callable(ns.func)
    ns = parse_arguments(["analyze", "ckpt", "--data", "code_alpaca", "x.jsonl", "--output", "o"])
    assert config_from_options(AnalyzeOptions, ns, overrides=False).data == ["code_alpaca", "x.jsonl"]


def test_bad_eval_options_name_the_option(capsys):
    assert main(["eval", "ckpt", "--benchmark", "apps"]) == 2
    assert "benchmark='apps' is not one of" in capsys.readouterr().err
    assert main(["eval", "ckpt", "--n-samples", "many"]) == 2
    assert "--n-samples='many'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- rescore
@pytest.fixture
def stored_run(monkeypatch, tmp_path):
    """A stored chat-style run whose solutions came from a broken extraction (the prose after a lone closing
    fence), as an older harness would have written them: the replies are right, the stored verdicts wrong."""
    from tests.tiny import CHAT_TEMPLATE

    problems = load_problems("humaneval", limit=2)
    replies = [problems[0].reference + "```\n\nThis function checks the distances.",
               f"def {problems[1].entry_point}(x):\n    return []\n```\nIt returns an empty list."]

    def fake_generate(model, tokenizer, problems, config, on_batch=None, done=None, on_token=None):
        samples = [Sample(p.task_id, 0, p.prompt, reply, p.prompt + "\n\n" + reply.split("```")[1], 7, expert=i,
                          router_probs=[0.25, 0.75]) for i, (p, reply) in enumerate(zip(problems, replies))]
        on_batch(samples)
        return samples

    monkeypatch.setattr(harness, "generate_samples", fake_generate)
    evaluate(make_base("llama"), make_tokenizer(CHAT_TEMPLATE), benchmark="humaneval", limit=2, prompt_style="chat",
             output_dir=tmp_path / "stored", limits=LIMITS, progress=False)
    return tmp_path / "stored"


def test_rescore_runs_stored_completions_through_todays_extraction(stored_run, tmp_path):
    before = (stored_run / "results.jsonl").read_bytes(), (stored_run / "summary.json").read_bytes()
    old_rows = read_rows(stored_run)
    assert [r["status"] for r in old_rows] == ["syntax_error", "syntax_error"]  # prose run as code
    summary = harness.rescore(stored_run, output_dir=tmp_path / "new", workers=2, progress=False)
    rows = read_rows(tmp_path / "new")
    assert [r["status"] for r in rows] == ["passed", "failed"]
    assert summary["pass@k"]["pass@1"] == 0.5 and summary["previous"]["pass@k"]["pass@1"] == 0.0
    assert summary["mode"] == "rescore" and summary["rescored_from"] == str(stored_run)
    assert summary["outcomes"]["passed"] == 1 and summary["experts"]["0"] == {"problems": 1, "pass@1": 1.0}
    for old, new in zip(old_rows, rows):  # generation-side fields are kept
        assert {k: new[k] for k in ("task_id", "completion", "expert", "router_probs", "new_tokens")} == {
            k: old[k] for k in ("task_id", "completion", "expert", "router_probs", "new_tokens")}
        assert "This function" not in new["solution"] and "It returns" not in new["solution"]
    assert ((stored_run / "results.jsonl").read_bytes(), (stored_run / "summary.json").read_bytes()) == before


def test_rescore_errors_name_the_folder(stored_run, tmp_path, capsys):
    with pytest.raises(EvaluationError, match="must differ"):
        harness.rescore(stored_run, output_dir=stored_run, progress=False)
    with pytest.raises(EvaluationError, match="summary.json not found"):
        harness.rescore(tmp_path / "nowhere", output_dir=tmp_path / "x", progress=False)
    refs = tmp_path / "refs"
    evaluate(None, benchmark="humaneval", limit=1, references=True, output_dir=refs, limits=LIMITS, progress=False)
    with pytest.raises(EvaluationError, match="'references' run"):
        harness.rescore(refs, output_dir=tmp_path / "y", progress=False)
    assert main(["eval", "--rescore", str(stored_run), "--no-progress"]) == 2
    assert "--rescore needs --output" in capsys.readouterr().err
    assert main(["eval", "--rescore", str(stored_run), "--output", str(tmp_path / "cli"), "--no-progress",
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "pass@1 = 0.5000" in out and "stored run: pass@1 = 0.0000" in out

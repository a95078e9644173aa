"""The CLI is built from the config dataclasses and reports errors without a traceback."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dylora_moe import ConfigError, DyLoRAMoEConfig
from dylora_moe.cli import build_parser, main
from dylora_moe.cli.options import config_from_options
from tests.tiny import make_base, make_tokenizer
from tests.training import BAD_DATA_CASES, break_file, isolate_data_registry, write_data_dir


def parse(*argv):
    return config_from_options(DyLoRAMoEConfig, build_parser().parse_args(["report", "m", *argv]), overrides=False)


def test_options_map_to_typed_fields():
    cfg = parse("--num-experts", "8", "--alpha", "64", "--target-modules", "q_proj,v_proj", "--routing", "token")
    assert cfg.num_experts == 8 and cfg.alpha == 64.0
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.routing == "token"
    assert parse("--target-modules", "all-linear").target_modules == "all-linear"
    assert parse().num_experts == 4


def test_bad_values_name_the_option():
    with pytest.raises(ConfigError, match=r"--num-experts='four'"):
        parse("--num-experts", "four")
    with pytest.raises(ConfigError, match=r"top_k=9"):
        parse("--top-k", "9")


def test_main_prints_clear_error(capsys):
    assert main(["report", "smollm2-135m", "--top-k", "9"]) == 2
    err = capsys.readouterr().err
    assert "dylora-moe: error:" in err and "top_k=9" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- train / generate / inspect
def tiny_run_files(tmp_path, monkeypatch):
    """A tiny local base model folder, a tiny data directory and a YAML config using both."""
    isolate_data_registry(monkeypatch)
    model_dir = tmp_path / "tiny-model"
    make_base("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    data_dir = write_data_dir(tmp_path / "data")
    config = {
        "model": str(model_dir),
        "output_dir": str(tmp_path / "unused"),
        "moe": {"num_experts": 2, "r": 4, "alpha": 8},
        "data": {"max_seq_length": 96, "eval_examples_per_domain": 2, "eval_batch_size": 4},
        "train": {"lr": 1.0e-2, "per_device_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 2,
                  "eval_every": 0, "save_every": 0},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, data_dir


@pytest.fixture
def run_files(tmp_path, monkeypatch, capsys):
    files = tiny_run_files(tmp_path, monkeypatch)
    capsys.readouterr()  # drop the progress output of saving the tiny model
    return files


def test_train_inspect_generate(tmp_path, run_files, capsys):
    config, data_dir = run_files
    out = tmp_path / "run"
    argv = ["train", "--config", str(config), "moe.num_experts=3", "--data-dir", str(data_dir),
            "--output-dir", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Verifying trainable parameters" in printed and "loss@0" in printed and "done: 2 optimizer steps" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["expert_share"]["mbpp"]) == 3 and metrics["global_step"] == 2

    assert main(["inspect", str(out)]) == 0  # a run directory means its final adapter
    shown = capsys.readouterr().out
    assert "expert 2: rank 4, alpha 8, mature" in shown and "Verifying trainable parameters" in shown
    assert "loss@0" in shown and "router entropy" in shown

    assert main(["generate", str(out / "checkpoint-2"), "--prompt", "write a function to add two numbers",
                 "--max-new-tokens", "4"]) == 0
    assert "[router: expert" in capsys.readouterr().out

    assert main(argv) == 2  # the run exists: a clear error instead of mixing two runs
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0


def test_generate_samples_reads_a_prompt_file_and_forces_an_expert(tmp_path, run_files, capsys):
    config, data_dir = run_files
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--data-dir", str(data_dir), "--output-dir", str(out)]) == 0
    capsys.readouterr()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in [
        {"instruction": "add two numbers"}, {"instruction": "sort a list", "input": "[3, 1]"},
        {"instruction": "print hello"}]))
    replies = tmp_path / "replies.jsonl"
    base = ["generate", str(out), "--prompts-file", str(prompts), "--max-new-tokens", "6", "--batch-size", "2"]
    assert main([*base, "--expert", "1", "--output", str(replies)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("[expert 1 of 2, forced") == 3 and "### 2: print hello" in printed
    rows = [json.loads(line) for line in replies.read_text().splitlines()]
    assert [r["instruction"] for r in rows] == ["add two numbers", "sort a list", "print hello"]
    assert rows[1]["input"] == "[3, 1]" and all(r["expert"] == 1 and r["forced"] for r in rows)

    def sampled(*extra):
        target = tmp_path / f"s{len(list(tmp_path.glob('s*.jsonl')))}.jsonl"
        assert main([*base, "--temperature", "5.0", "--top-p", "1.0", *extra, "--output", str(target)]) == 0
        return [json.loads(line)["reply"] for line in target.read_text().splitlines()]

    greedy = [r["reply"] for r in (json.loads(line) for line in replies.read_text().splitlines())]
    assert sampled("--seed", "3") == sampled("--seed", "3")  # a seed makes sampling repeatable
    assert sampled("--seed", "3") != sampled("--seed", "4") or sampled("--seed", "3") != greedy
    capsys.readouterr()
    txt = tmp_path / "prompts.txt"
    txt.write_text("add two numbers\n\nprint hello\n")
    assert main(["generate", str(out), "--prompts-file", str(txt), "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.count("[router: expert") == 2


def test_generate_refuses_bad_options_clearly(tmp_path, run_files, capsys):
    config, data_dir = run_files
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--data-dir", str(data_dir), "--output-dir", str(out)]) == 0
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"instruction": "fine"}\n{"input": "no instruction"}\n')
    for argv, message in [
        (["--prompt", "x", "--expert", "7"], "--expert=7: "),
        (["--prompt", "x", "--temperature", "-1"], "--temperature=-1.0: must be >= 0"),
        (["--prompt", "x", "--top-p", "0"], "--top-p=0.0: must be in (0, 1]"),
        ([], "give exactly one of --prompt and --prompts-file"),
        (["--prompts-file", str(bad)], "prompts.jsonl:2: missing or empty 'instruction'"),
    ]:
        capsys.readouterr()
        assert main(["generate", str(out), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert "dylora-moe: error:" in err and message in err and "Traceback" not in err, (argv, err)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["train.lr=abc"], "key 'train.lr': expected a number, got 'abc'"),
        (["moe.num_expert=3"], "unknown key 'moe.num_expert'"),
        (["data.max_seq_length=0"], "key 'data.max_seq_length' = 0: must be a positive integer"),
    ],
)
def test_train_config_errors_are_clean(run_files, capsys, extra, message):
    config, _ = run_files
    assert main(["train", "--config", str(config), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dylora-moe: error:") and message in err and "Traceback" not in err


def test_train_file_errors_are_clean(tmp_path, run_files, capsys):
    _, data_dir = run_files
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: config file not found" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["inspect", str(data_dir)]) == 2
    assert "no DyLoRA-MoE adapter here" in capsys.readouterr().err


@pytest.mark.parametrize("case", BAD_DATA_CASES)
def test_train_data_errors_are_clean(tmp_path, run_files, capsys, case):
    config, data_dir = run_files
    match = break_file(data_dir, case)
    argv = ["train", "--config", str(config), "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dylora-moe: error:") and re.search(match, err) and "Traceback" not in err


@pytest.mark.parametrize("command", ["train", "report", "generate", "inspect", "eval", "compare", "analyze",
                                     "study", "learn-skill", "continual"])
def test_every_command_is_registered_with_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"dylora-moe {command}" in capsys.readouterr().out


def test_commands_that_need_no_model_never_import_torch(tmp_path):
    """Building the parser, the references check and compare run without torch (start-up time)."""
    code = (
        "import sys; from dylora_moe.cli import main\n"
        f"assert main(['eval', '--references', '--limit', '2', '--output', {str(tmp_path / 'refs')!r}, "
        "'--no-progress', '--workers', '1']) == 0\n"
        f"assert main(['compare', {str(tmp_path / 'refs')!r}, {str(tmp_path / 'refs')!r}]) == 0\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"


def test_config_errors_come_back_before_torch_is_imported(tmp_path):
    """A bad setting is reported at once: every command validates its configs before importing torch."""
    bad = [
        ["train", "--config", "configs/cpu-demo.yaml", "moe.top_k=9"],
        ["report", "smollm2-135m", "--top-k", "0"],
        ["generate", "nowhere", "--prompt", "x", "--temperature", "-1"],
        ["study", "--config", "configs/study-domains.yaml", "parallel=0"],
        ["learn-skill", "nowhere", "--data", "x.jsonl", "--name", "x", "protection=magic"],
        ["continual", "orders=[[0,0,1]]"],
        ["analyze", "nowhere", "--data", "mbpp", "--output", "x", "--batch-size", "0"],
    ]
    code = (
        "import sys; from dylora_moe.cli import main\n"
        f"codes = [main(argv) for argv in {bad!r}]\n"
        "print(codes, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert done.stdout.strip().splitlines()[-1] == f"{[2] * len(bad)} False False", done.stderr
    assert done.stderr.count("dylora-moe: error:") == len(bad) and "Traceback" not in done.stderr


def test_ctrl_c_during_training_saves_the_step_and_prints_the_resume_command(tmp_path, run_files, capsys,
                                                                              monkeypatch):
    import os
    import signal

    from dylora_moe.training import JointTrainer

    config, data_dir = run_files
    out = tmp_path / "run"
    argv = ["train", "--config", str(config), "--data-dir", str(data_dir), "--output-dir", str(out),
            "train.max_steps=4"]
    real = JointTrainer.after_step

    def after_step(self, state, presses=1):
        real(self, state)
        if state.step == 2:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as patch:
        patch.setattr(JointTrainer, "after_step", after_step)
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "training interrupted at step 2 of 4" in err and "Traceback" not in err
    assert f"continue from {out / 'checkpoint-2'} with:" in err and "train.max_steps=4 --resume" in err
    assert (out / "checkpoint-2").is_dir() and not (out / "final").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    assert main([*argv, "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 4

    again = tmp_path / "again"  # two presses: stop at once, before the step is saved
    with monkeypatch.context() as patch:
        patch.setattr(JointTrainer, "after_step", lambda self, state: after_step(self, state, presses=2))
        assert main([*argv[:-2], str(again), "train.max_steps=4"]) == 130
    err = capsys.readouterr().err
    assert "training interrupted at step 2 of 4; no checkpoint of this step was written" in err
    assert "no checkpoint was written yet" in err and not list(again.glob("checkpoint-*"))

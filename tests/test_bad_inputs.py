"""One table of bad inputs across the command line: each must end with a clear ``dylora-moe: error: ...``
naming what is wrong (and where), exit status 2, and no traceback. Other tests cover each area in depth
(config, data, checkpoints, evaluation, learn-skill); this table is the catalogue of docs/reliability.md."""

from __future__ import annotations

import json
import re

import pytest

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.cli import main
from tests.test_cli import tiny_run_files
from tests.tiny import make_base


@pytest.fixture
def setup(tmp_path, monkeypatch, capsys):
    config, data_dir = tiny_run_files(tmp_path, monkeypatch)
    model_dir = tmp_path / "tiny-model"
    ckpt = tmp_path / "ckpt"
    DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=2, r=4, alpha=8),
                         base_name_or_path=str(model_dir)).save_pretrained(ckpt)
    other = tmp_path / "other-model"
    make_base("qwen2").save_pretrained(other)
    (tmp_path / "a-file").write_text("x")
    capsys.readouterr()
    return {"config": config, "data": data_dir, "ckpt": ckpt, "other": other, "tmp": tmp_path}


def _write(path, text):
    path.write_text(text)
    return str(path)


CASES = {
    "missing config file": (lambda s: ["train", "--config", str(s["tmp"] / "nope.yaml")],
                            r"nope\.yaml: config file not found"),
    "malformed config": (lambda s: ["train", "--config", _write(s["tmp"] / "bad.yaml", "train: [1, 2\n")],
                         r"bad\.yaml:\d+: malformed YAML"),
    "unknown config key": (lambda s: ["train", "--config", str(s["config"]), "train.learning_rate=1"],
                           r"unknown key 'train\.learning_rate'"),
    "unknown dataset name": (lambda s: ["train", "--config", str(s["config"]), "--data-dir", str(s["data"]),
                                        "data.datasets.0.name=no_such_set"], r"no_such_set"),
    "malformed JSONL line": (lambda s: ["learn-skill", str(s["ckpt"]), "--name", "x", "--data",
                                        _write(s["tmp"] / "bad.jsonl", '{"instruction": "a", "output": "b"}\n{oops\n')],
                             r"bad\.jsonl:2: malformed JSON"),
    "empty dataset": (lambda s: ["learn-skill", str(s["ckpt"]), "--name", "x", "--data",
                                 _write(s["tmp"] / "empty.jsonl", "")], r"empty\.jsonl: empty file"),
    "wrong column names": (lambda s: ["learn-skill", str(s["ckpt"]), "--name", "x", "--data",
                                      _write(s["tmp"] / "cols.jsonl", '{"prompt": "a", "completion": "b"}\n')],
                           r"cols\.jsonl:1: .*'instruction'"),
    "sequence length <= 0": (lambda s: ["train", "--config", str(s["config"]), "data.max_seq_length=-3"],
                             r"data\.max_seq_length"),
    "top-k larger than the experts": (lambda s: ["train", "--config", str(s["config"]), "moe.top_k=5"],
                                      r"top_k"),
    "checkpoint of another base model": (lambda s: ["inspect", str(s["ckpt"]), "--base-model", str(s["other"])],
                                         r"different configuration"),
    "checkpoint of a newer format": (lambda s: ["inspect", str(_newer(s["ckpt"]))],
                                     r"format_version 99 was written by a newer dylora-moe"),
    "output dir that cannot be created": (lambda s: ["train", "--config", str(s["config"]), "--data-dir",
                                                     str(s["data"]), "--output-dir", str(s["tmp"] / "a-file" / "run")],
                                          r"output_dir .*a-file/run: cannot be created or written to"),
    "unwritable output dir": (lambda s: ["train", "--config", str(s["config"]), "--data-dir", str(s["data"]),
                                         "--output-dir", "/proc/self"], r"output_dir /proc/self: cannot be"),
}


def _newer(ckpt):
    meta = json.loads((ckpt / "dylora_moe_config.json").read_text())
    meta["format_version"] = 99
    (ckpt / "dylora_moe_config.json").write_text(json.dumps(meta))
    return ckpt


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_a_clear_error(setup, capsys, case):
    argv, pattern = CASES[case]
    code = main(argv(setup))
    captured = capsys.readouterr()
    assert code == 2, (case, captured.err[-2000:])
    last = [line for line in captured.err.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert last.startswith("dylora-moe: error: "), captured.err[-2000:]  # (after any progress bars)
    assert re.search(pattern, captured.err), captured.err
    assert "Traceback" not in captured.err + captured.out

"""TrainConfig: YAML loading, dotted overrides, validation errors naming file and key, presets, JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

from dylora_moe import ConfigError
from dylora_moe.training import TrainConfig, apply_overrides, config_reference, config_reference_markdown

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_sections_and_overrides(tmp_path):
    path = write(tmp_path, "model: m\nmoe: {num_experts: 2}\ntrain:\n  lr: 2e-5\n  max_steps: 3\n")
    overrides = ["moe.num_experts=8", "train.lr=1e-4", "data.datasets.1.weight=3", "data.max_seq_length=128",
                 "output_dir=elsewhere", "moe.target_modules=[q_proj]"]
    cfg = TrainConfig.from_yaml(path, overrides)
    assert cfg.model == "m" and cfg.output_dir == "elsewhere"
    assert cfg.moe.num_experts == 8 and cfg.moe.target_modules == ["q_proj"]
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float) and cfg.train.max_steps == 3
    assert [d.weight for d in cfg.data.datasets] == [1.0, 3.0] and cfg.data.max_seq_length == 128


def test_pyyaml_style_exponent_floats_are_accepted(tmp_path):
    cfg = TrainConfig.from_yaml(write(tmp_path, "train: {lr: 2e-5, weight_decay: 1e-2}\n"))
    assert cfg.train.lr == 2e-5 and cfg.train.weight_decay == 0.01


def test_dataset_list_can_be_replaced_or_extended(tmp_path):
    path = write(tmp_path, "data:\n  datasets:\n    - {name: mbpp}\n")
    cfg = TrainConfig.from_yaml(path, ["data.datasets.1.name=sql", "data.datasets.1.path=sql.jsonl"])
    assert [(d.name, d.path) for d in cfg.data.datasets] == [("mbpp", None), ("sql", "sql.jsonl")]


@pytest.mark.parametrize(
    "text,match",
    [
        ("modle: x\n", r"run\.yaml: unknown key\(s\) \['modle'\]"),
        ("train: {learning_rate: 1.0e-4}\n", r"run\.yaml: unknown key\(s\) \['train\.learning_rate'\]"),
        ("data: {max_seq_length: 0}\n", r"run\.yaml: key 'data\.max_seq_length' = 0: must be a positive integer"),
        ("data: {max_seq_length: -5}\n", r"key 'data\.max_seq_length' = -5"),
        ("train: {lr: fast}\n", r"run\.yaml: key 'train\.lr': expected a number, got 'fast'"),
        ("train: {per_device_batch_size: 2.5}\n", r"key 'train\.per_device_batch_size': expected an integer"),
        ("train: {gradient_checkpointing: 1}\n", r"key 'train\.gradient_checkpointing': expected true or false"),
        ("data: {mixing: shuffle}\n", r"key 'data\.mixing' = 'shuffle': must be one of"),
        ("train: {precision: fp8}\n", r"key 'train\.precision' = 'fp8'"),
        ("moe: {top_k: 9}\n", r"run\.yaml: key 'moe': DyLoRAMoEConfig\.top_k=9"),
        ("data: {datasets: [{name: a}, {name: a}]}\n", r"key 'data\.datasets\.1\.domain'.*used twice"),
        ("data: {datasets: [{weight: 1}]}\n", r"key 'data\.datasets\.0\.name' is required"),
        ("- a\n- b\n", r"run\.yaml: the top level must be a mapping"),
        ("train: [1\n", r"run\.yaml:\d+: malformed YAML"),
    ],
)
def test_file_errors_name_file_and_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_yaml(write(tmp_path, text))


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.lr", r"override 'train\.lr': expected KEY=VALUE"),
        ("=3", r"expected KEY=VALUE"),
        ("moe.num_expert=8", r"override 'moe\.num_expert=8': unknown key 'moe\.num_expert'; known keys in moe"),
        ("trian.lr=1", r"unknown key 'trian'"),
        ("train.lr=abc", r"override 'train\.lr=abc': key 'train\.lr': expected a number, got 'abc'"),
        ("data.max_seq_length=0", r"override 'data\.max_seq_length=0': key 'data\.max_seq_length' = 0"),
        ("data.datasets.5.weight=1", r"index 5 is out of range"),
        ("model.name=x", r"'model\.name': model is not a section"),
        ("moe.r=0", r"override 'moe\.r=0': key 'moe'.*r=0"),
    ],
)
def test_override_errors_name_the_override(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_yaml(write(tmp_path, "model: m\n"), [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")


def test_json_round_trip_with_version(tmp_path):
    cfg = TrainConfig.from_yaml(CONFIGS / "cpu-demo.yaml", ["moe.num_experts=3"])
    path = cfg.to_json_file(tmp_path / "train_config.json")
    assert '"format_version": 1' in path.read_text()
    assert TrainConfig.from_json_file(path) == cfg
    path.write_text('{"format_version": 99, "config": {}}')
    with pytest.raises(ConfigError, match="newer"):
        TrainConfig.from_json_file(path)


def test_presets():
    default = TrainConfig.from_yaml(CONFIGS / "default.yaml")
    assert default == TrainConfig()  # the dataclass defaults are the seed's
    assert (default.moe.num_experts, default.moe.r, default.moe.alpha, default.moe.dropout) == (4, 16, 32.0, 0.05)
    t = default.train
    assert (t.lr, t.per_device_batch_size, t.gradient_accumulation_steps, t.num_epochs) == (2e-5, 4, 8, 10.0)
    assert (t.precision, t.lr_scheduler) == ("auto", "cosine") and t.max_grad_norm > 0 and t.weight_decay > 0
    assert default.data.mixing == "interleave" and [d.name for d in default.data.datasets] == ["code_alpaca", "mbpp"]
    more = TrainConfig.from_yaml(CONFIGS / "more-capacity.yaml")
    assert (more.moe.num_experts, more.moe.r, more.moe.alpha) == (8, 32, 64.0)
    small = TrainConfig.from_yaml(CONFIGS / "memory-constrained.yaml")
    assert (small.moe.num_experts, small.moe.r, small.train.per_device_batch_size) == (2, 8, 2)
    demo = TrainConfig.from_yaml(CONFIGS / "cpu-demo.yaml")
    assert demo.model == "smollm2-135m" and demo.train.max_steps > 0 and demo.output_dir == "runs/cpu-demo"


def test_replace_and_apply_overrides_do_not_mutate():
    cfg = TrainConfig()
    other = cfg.replace(**{"train.lr": 1e-3, "output_dir": "x"})
    assert (other.train.lr, other.output_dir) == (1e-3, "x") and cfg.train.lr == 2e-5
    data = {"train": {"lr": 1.0}}
    assert apply_overrides(data, ["train.lr=2"], TrainConfig) == {"train": {"lr": 2}} and data == {"train": {"lr": 1.0}}


def test_every_key_has_help():
    rows = config_reference()
    keys = {row[0] for row in rows}
    assert {"moe.num_experts", "train.lr", "data.max_seq_length", "data.datasets.N.weight", "resume"} <= keys
    assert all(row[3] for row in rows)
    assert "| `train.lr` | `float` | `2e-05` |" in config_reference_markdown()


def test_a_quantized_base_is_refused_clearly_where_bitsandbytes_cannot_run(tmp_path, capsys, monkeypatch):
    """The CPU suite's check of QLoRA (configs/qlora.yaml): a machine without a CUDA GPU refuses at start, before
    anything is written; the config itself is valid, and a quantized base cannot take SVD-initialised experts."""
    import torch

    from dylora_moe.cli import main
    from dylora_moe.errors import BaseModelError
    from dylora_moe.loading import quantization_config

    preset = str(Path(__file__).resolve().parents[2] / "configs" / "qlora.yaml")
    config = TrainConfig.from_yaml(preset)
    assert config.train.base_quantization == "nf4" and config.moe.target_modules == "all-linear"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, or a GPU machine made to look so
    with pytest.raises(BaseModelError, match="nf4 base model needs a CUDA GPU"):
        quantization_config("nf4", torch.bfloat16)
    out = tmp_path / "run"
    assert main(["train", "--config", preset, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "dylora-moe: error:" in err and "needs a CUDA GPU" in err and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(ConfigError, match="train.base_quantization.*must be one of"):
        TrainConfig.from_yaml(preset, ["train.base_quantization=3bit"])
    with pytest.raises(ConfigError, match="no dense weights to take SVD segments from"):
        TrainConfig.from_yaml(preset, ["moe.expert_init=svd"])

"""Integration: the real cpu-demo config (embedded SmolLM2-135M, real Code Alpaca + MBPP) for 2 optimizer steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dylora_moe.cli import main

from . import isolate_data_registry

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_cpu_demo_config_two_steps(tmp_path, monkeypatch, capsys, shared_data):
    isolate_data_registry(monkeypatch)
    out = tmp_path / "run"
    argv = ["train", "--config", str(ROOT / "configs" / "cpu-demo.yaml"),
            "train.max_steps=2", "train.gradient_accumulation_steps=1", "train.eval_every=0", "train.save_every=0",
            "data.eval_examples_per_domain=4", "--data-dir", str(shared_data), "--output-dir", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Verifying trainable parameters" in printed and "truncated" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    for domain in ("code_alpaca", "mbpp"):
        assert metrics["eval_loss"]["start"][domain] > 0 and metrics["eval_loss"]["end"][domain] > 0
        assert len(metrics["expert_share"][domain]) == 4
    assert metrics["global_step"] == 2 and metrics["model"] == "smollm2-135m"
    assert (out / "routing.png").is_file() and (out / "final" / "dylora_moe_weights.safetensors").is_file()

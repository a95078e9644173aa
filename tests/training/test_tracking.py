"""Experiment tracking through Accelerate's trackers (dylora_moe.training.tracking): TensorBoard, MLflow and W&B,
offline, with the run's numbers read back from each."""

from __future__ import annotations

import importlib.util

import pytest

from dylora_moe.errors import ConfigError
from dylora_moe.training import JointTrainer
from dylora_moe.training.tracking import check_reporters, flat_config
from tests.training import isolate_data_registry, tiny_config, tiny_model_and_tokenizer, write_data_dir


def test_a_run_reports_to_tensorboard_mlflow_and_wandb_offline(tmp_path, monkeypatch):
    isolate_data_registry(monkeypatch)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    config = tiny_config(out, write_data_dir(tmp_path / "data"), **{
        "train.max_steps": 2, "train.report_to": ["tensorboard", "mlflow", "wandb"], "train.run_name": "tiny"})
    result = JointTrainer(config, *tiny_model_and_tokenizer()).train()
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    [experiment] = [e for e in client.search_experiments() if e.name == "dylora-moe"]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny" and run.data.params["train.lr"] == "0.01"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2]
    assert losses[-1].value == pytest.approx(result.metrics["train_log"][-1]["loss"])
    end = client.get_metric_history(run.info.run_id, "eval/loss/mbpp")[-1]
    assert end.step == 2 and end.value == pytest.approx(result.metrics["eval_loss"]["end"]["mbpp"])

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))


def test_unknown_or_missing_trackers_are_refused_before_training(monkeypatch):
    with pytest.raises(ConfigError, match="unknown tracker 'comet'"):
        check_reporters(["comet"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"'wandb' needs the wandb package.*pip install wandb"):
        check_reporters(["tensorboard", "wandb"])
    check_reporters([])  # none


def test_flat_config_gives_trackers_scalars():
    flat = flat_config({"train": {"lr": 0.1, "report_to": ["a"]}, "moe": {"target_modules": None}, "seed": 3})
    assert flat == {"train.lr": 0.1, "train.report_to": "['a']", "moe.target_modules": "null", "seed": 3}

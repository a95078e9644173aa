"""Bad data files reach the user as the documented ``DataError`` (file, line/record, field), before any training."""

from __future__ import annotations

import pytest

from dylora_moe.data import DataError
from dylora_moe.training import JointTrainer

from . import BAD_DATA_CASES, break_file, isolate_data_registry, tiny_config, tiny_model_and_tokenizer, write_data_dir


@pytest.mark.parametrize("case", BAD_DATA_CASES)
def test_trainer_raises_data_error(tmp_path, monkeypatch, case):
    isolate_data_registry(monkeypatch)
    data_dir = write_data_dir(tmp_path / "data")
    match = break_file(data_dir, case)
    trainer = JointTrainer(tiny_config(tmp_path / "run", data_dir), *tiny_model_and_tokenizer())
    with pytest.raises(DataError, match=match):
        trainer.train()
    assert trainer.model is None  # failed while loading data, before touching the model


def test_missing_data_dir_and_unknown_dataset(tmp_path, monkeypatch):
    isolate_data_registry(monkeypatch)
    with pytest.raises(DataError, match="does not exist"):
        JointTrainer(tiny_config(tmp_path / "run", tmp_path / "nowhere"), *tiny_model_and_tokenizer()).train()
    from dylora_moe import ConfigError

    config = tiny_config(tmp_path / "run", write_data_dir(tmp_path / "data"), **{"data.datasets.1.name": "sql"})
    with pytest.raises(ConfigError, match=r"'data\.datasets\.1\.name' = 'sql' is not a registered dataset"):
        JointTrainer(config, *tiny_model_and_tokenizer()).train()

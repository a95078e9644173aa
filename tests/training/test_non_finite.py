"""Non-finite losses or gradients: the step is skipped with a warning (parameters unchanged), and after
``train.max_bad_steps`` in a row training stops with a clear error, leaving the last good checkpoint."""

from __future__ import annotations

import math

import pytest
from safetensors.torch import load_file

from dylora_moe.common.runs import ADAPTER_DIR
from dylora_moe.training import JointTrainer, TrainingError

from . import isolate_data_registry, tiny_config, tiny_model_and_tokenizer, write_data_dir


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    isolate_data_registry(monkeypatch)
    return write_data_dir(tmp_path / "data")


def poisoned(bad_micro_batches: set[int]):
    """The tiny model and tokenizer, with NaN final hidden states (so NaN logits and loss) on the given training
    micro-batches (0-based)."""
    model, tokenizer = tiny_model_and_tokenizer()
    seen = {"n": 0}

    def hook(module, args, output):
        if not module.training:
            return None
        index = seen["n"]
        seen["n"] += 1
        return output * math.nan if index in bad_micro_batches else None

    model.get_decoder().norm.register_forward_hook(hook)
    return model, tokenizer


def adapter(out, step):
    return load_file(str(out / f"checkpoint-{step}" / ADAPTER_DIR / "dylora_moe_weights.safetensors"))


def test_a_bad_step_is_skipped_and_training_goes_on(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    config = tiny_config(out, data_dir, **{"train.save_every": 1, "train.save_total_limit": 0,
                                           "train.eval_every": 0})
    result = JointTrainer(config, *poisoned({4, 5})).train()  # accumulation 2: step 3 is bad
    printed = capsys.readouterr().out
    assert "warning: step 3: non-finite loss or gradient" in printed and "(1 in a row)" in printed
    assert result.global_step == 6
    before, after = adapter(out, 2), adapter(out, 3)
    assert all((before[k] == after[k]).all() for k in before)  # the bad step changed nothing
    later = adapter(out, 4)
    assert any(not (after[k] == later[k]).all() for k in after)  # the next good step trains again
    assert all(math.isfinite(row["loss"]) for row in result.metrics["train_log"])


def test_too_many_bad_steps_stop_with_a_clear_error(tmp_path, data_dir):
    out = tmp_path / "run"
    config = tiny_config(out, data_dir, **{"train.save_every": 1, "train.save_total_limit": 0,
                                           "train.eval_every": 0, "train.max_bad_steps": 2})
    with pytest.raises(TrainingError, match=r"stopping at step 3: 2 consecutive steps .*max_bad_steps=2.* "
                                            r"last good checkpoint is .*checkpoint-2"):
        JointTrainer(config, *poisoned(set(range(2, 100)))).train()
    assert not (out / "checkpoint-3").exists() and not (out / "final").exists()
    assert (out / "checkpoint-1").is_dir()


SCRIPT = '''
import resource, sys
from dylora_moe.training import JointTrainer, TrainConfig, checkpoint
from tests.training import tiny_model_and_tokenizer

original, calls = checkpoint.save_checkpoint, []

def limited(directory, **kwargs):  # the disk "fills up" before the second checkpoint
    calls.append(directory)
    if len(calls) == 2:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    return original(directory, **kwargs)

checkpoint.save_checkpoint = limited
JointTrainer(TrainConfig.from_json_file(sys.argv[1]), *tiny_model_and_tokenizer()).train()
'''


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, data_dir):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from dylora_moe.training.checkpoint import verify_checkpoint

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "run"
    config = tiny_config(out, data_dir, **{"train.save_every": 1, "train.save_total_limit": 0,
                                           "train.eval_every": 0})
    config.to_json_file(tmp_path / "config.json")
    (tmp_path / "run_full.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, str(tmp_path / "run_full.py"), str(tmp_path / "config.json")],
                          env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "TrainingError: could not write" in done.stderr and "disk full or a file size limit" in done.stderr
    assert "checkpoint-1 is intact" in done.stderr
    verify_checkpoint(out / "checkpoint-1")
    assert not (out / "checkpoint-2").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no half-written leftovers

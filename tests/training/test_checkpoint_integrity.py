"""Checkpoint manifests: truncated or corrupt files are detected by name, and --resume falls back to the
newest checkpoint that is intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dylora_moe import CheckpointError
from dylora_moe.common.runs import ADAPTER_DIR
from dylora_moe.training import JointTrainer
from dylora_moe.training.checkpoint import (
    LEGACY_FILES,
    MANIFEST_FILE,
    OPTIMIZER_FILE,
    newest_valid_checkpoint,
    verify_checkpoint,
)

from . import isolate_data_registry, tiny_config, tiny_model_and_tokenizer, write_data_dir


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    isolate_data_registry(monkeypatch)
    data = write_data_dir(tmp_path / "data")
    config = tiny_config(tmp_path / "run", data, **{"train.max_steps": 6, "train.save_every": 2,
                                                    "train.save_total_limit": 0, "train.eval_every": 0})
    trainer = JointTrainer(config, *tiny_model_and_tokenizer())
    trainer.train()
    return tmp_path / "run", data, trained(trainer)


def trained(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_a_checkpoint_without_manifest_must_still_hold_every_file_it_resumes_from(run_dir):
    """Checkpoints from before manifests have nothing to compare against, but a folder with only
    trainer_state.json (hand-damaged, or half-deleted by an old prune) is not taken for one."""
    out, _, _ = run_dir
    ckpt = out / "checkpoint-4"
    (ckpt / MANIFEST_FILE).unlink()
    verify_checkpoint(ckpt)  # complete: accepted
    for name in LEGACY_FILES:
        path = ckpt / name
        data = path.read_bytes()
        path.write_bytes(b"")
        with pytest.raises(CheckpointError, match=f"{name}: empty"):
            verify_checkpoint(ckpt)
        path.unlink()
        gone = "not a checkpoint" if name == "trainer_state.json" else f"{name}: missing .*without manifest.json"
        with pytest.raises(CheckpointError, match=gone):
            verify_checkpoint(ckpt)
        assert newest_valid_checkpoint(out)[0].name != "checkpoint-4"
        path.write_bytes(data)
    verify_checkpoint(ckpt)


def test_manifest_lists_every_file_and_detects_damage(run_dir):
    out, _, _ = run_dir
    ckpt = out / "checkpoint-4"
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
    assert OPTIMIZER_FILE in manifest and f"{ADAPTER_DIR}/dylora_moe_weights.safetensors" in manifest
    verify_checkpoint(ckpt)
    weights = ckpt / ADAPTER_DIR / "dylora_moe_weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="dylora_moe_weights.safetensors: .* bytes, the manifest says"):
        verify_checkpoint(ckpt)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # same size, one bit pattern changed
    with pytest.raises(CheckpointError, match="contents differ from the manifest"):
        verify_checkpoint(ckpt)
    weights.write_bytes(data)
    verify_checkpoint(ckpt)
    (ckpt / OPTIMIZER_FILE).unlink()
    with pytest.raises(CheckpointError, match="optimizer.pt: missing"):
        verify_checkpoint(ckpt)


@pytest.mark.exact
def test_resume_falls_back_to_the_newest_intact_checkpoint(run_dir, capsys):
    out, data, uninterrupted = run_dir
    import shutil

    shutil.rmtree(out / "checkpoint-6")  # as if killed after step 4 was saved ...
    shutil.rmtree(out / "final")
    optimizer = out / "checkpoint-4" / OPTIMIZER_FILE
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # ... with checkpoint-4 damaged: resume from checkpoint-2
    good, skipped = newest_valid_checkpoint(out)
    assert good.name == "checkpoint-2" and [p.name for p, _ in skipped] == ["checkpoint-4"]
    resumed = JointTrainer(tiny_config(out, data, resume=True, **{"train.max_steps": 6, "train.save_every": 2,
                                                                   "train.save_total_limit": 0,
                                                                   "train.eval_every": 0}),
                           *tiny_model_and_tokenizer())
    resumed.train()
    printed = capsys.readouterr().out
    assert "skipping checkpoint-4, it fails its integrity check" in printed
    assert "resuming from" in printed and "checkpoint-2" in printed
    ours = trained(resumed)
    assert all(torch.equal(ours[k], uninterrupted[k]) for k in ours)  # exactly the uninterrupted run
    verify_checkpoint(out / "checkpoint-4")  # rewritten, intact again


def test_resume_with_no_intact_checkpoint_says_why(run_dir):
    out, data, _ = run_dir
    for step in (2, 4, 6):
        (out / f"checkpoint-{step}" / OPTIMIZER_FILE).write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no checkpoint passes its integrity check"):
        JointTrainer(tiny_config(out, data, resume=True, **{"train.max_steps": 6}),
                     *tiny_model_and_tokenizer()).train()


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(run_dir, monkeypatch):
    """Rotation deletes old checkpoints. A process killed in the middle of that deletion (simulated: the manifest
    and the adapter weights are gone, then the process dies) must not leave a half-deleted folder under a
    checkpoint name, where it would verify vacuously (no manifest) and fail to load."""
    import shutil

    from dylora_moe import DyLoRAMoEForCausalLM
    from dylora_moe.common.runs import list_checkpoints
    from dylora_moe.serialization import WEIGHTS_FILE
    from dylora_moe.training.checkpoint import prune_checkpoints
    from tests.tiny import make_base

    out, _, _ = run_dir
    before = list_checkpoints(out)
    assert [p.name for p in before] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]

    class Killed(BaseException):
        pass

    def dies_half_way(path, *args, **kwargs):
        path = Path(path)
        (path / MANIFEST_FILE).unlink()
        (path / ADAPTER_DIR / WEIGHTS_FILE).unlink()
        raise Killed

    real_rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", dies_half_way)
    with pytest.raises(Killed):
        prune_checkpoints(out, keep=2)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    for ckpt in list_checkpoints(out):
        verify_checkpoint(ckpt)
        DyLoRAMoEForCausalLM.from_pretrained(ckpt / ADAPTER_DIR, base_model=make_base("llama"))
    assert newest_valid_checkpoint(out)[0].name == "checkpoint-6"

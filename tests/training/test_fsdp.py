"""Sharded training (``train.distributed=fsdp``, PyTorch FSDP2) on two CPU processes (gloo, torchrun).

The tiny llama with sparse top-1 *sequence* routing, so that in most steps some expert is chosen by no
sequence of one process (the case that must neither hang nor change the maths). Checks: the loss of every
step and the final adapter equal one process with the same global batch; each rank held half of the frozen
base; the gathered final adapter, loaded in one process, gives the sharded model's logits; a run killed after
the checkpoint of step 3 resumes (under 2 processes, and under 1) to the uninterrupted run's end; and bad
launches fail at the start, writing nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dylora_moe import ConfigError, DyLoRAMoEForCausalLM
from dylora_moe.layout import WEIGHTS_FILE
from dylora_moe.training import JointTrainer, TrainConfig
from dylora_moe.training.checkpoint import SHARDED_DIR, verify_checkpoint
from dylora_moe.training.sharding import resolve_accumulation
from tests.tiny import make_base

from . import isolate_data_registry, tiny_config, tiny_model_and_tokenizer, write_data_dir
from .test_distributed import launch

SCRIPT = '''
import os, sys, torch
from dylora_moe.training import JointTrainer, TrainConfig
from tests.training import tiny_model_and_tokenizer
config = TrainConfig.from_json_file(sys.argv[1])
kill_at = int(sys.argv[2])
if kill_at:  # every process dies without cleanup right after the checkpoint of that step
    after_step = JointTrainer.after_step
    def dying(self, state):
        after_step(self, state)
        if state.step == kill_at:
            os._exit(9)
    JointTrainer.after_step = dying
trainer = JointTrainer(config, *tiny_model_and_tokenizer())
trainer.train()
model = trainer.model
base = {n: p.to_local().numel() for n, p in model.base_model.named_parameters() if not p.requires_grad}
model.eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])).logits
rank = trainer.accelerator.process_index
torch.save({"logits": logits, "base_local_numel": sum(base.values())}, f"{config.output_dir}/rank{rank}.pt")
trainer.shutdown()
'''


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    isolate_data_registry(monkeypatch)
    return write_data_dir(tmp_path / "data")


def config_for(out: Path, data_dir: Path, accum: int, **changes) -> TrainConfig:
    return tiny_config(out, data_dir, **{
        "moe.dropout": 0.0, "moe.routing": "sequence", "train.per_device_batch_size": 2,
        "train.gradient_accumulation_steps": accum, "train.max_steps": 5, "train.eval_every": 5,
        "train.save_every": 1, "train.save_total_limit": 0, "train.register_skills": True, **changes})


def losses(run: Path) -> list[float]:
    return [row["lm_loss"] for row in json.loads((run / "metrics.json").read_text())["train_log"]]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / WEIGHTS_FILE))


def assert_same_adapter(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """One uninterrupted 2-process FSDP run (shared by the tests below)."""
    root = tmp_path_factory.mktemp("fsdp")
    monkeypatch = pytest.MonkeyPatch()
    isolate_data_registry(monkeypatch)
    data = write_data_dir(root / "data")
    config = config_for(root / "two", data, accum=1, **{"train.distributed": "fsdp"})
    done = launch(config, root, SCRIPT, "0")
    monkeypatch.undo()
    return root / "two", data, done


def test_two_sharded_processes_equal_one_process(fsdp_run, tmp_path, tiny_data):
    two, _, launched = fsdp_run
    single = JointTrainer(config_for(tmp_path / "one", tiny_data, accum=2), *tiny_model_and_tokenizer())
    result = single.train()
    assert len(losses(two)) == 5
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(tmp_path / "one")), rtol=1e-5, atol=1e-5)
    assert_same_adapter(adapter(two), adapter(tmp_path / "one"))
    start = DyLoRAMoEForCausalLM(make_base("llama"), config_for(tmp_path, tiny_data, 1).moe, mature=True)
    assert any(not torch.equal(adapter(two)[n], p.detach()) for n, p in start.named_parameters() if n in adapter(two))
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert "All experts share one frozen base model: yes" in launched.stdout  # the report reads the shards
    for domain, loss in result.metrics["eval_loss"]["end"].items():
        assert metrics["eval_loss"]["end"][domain] == pytest.approx(loss, rel=1e-5)
    # each process held half of every frozen base tensor (the shards of an odd first dimension differ by a row)
    full = sum(p.numel() for p in make_base("llama").parameters())
    held = [torch.load(two / f"rank{r}.pt")["base_local_numel"] for r in (0, 1)]
    assert sum(held) == full and all(0.45 * full < h < 0.55 * full for h in held)
    # the skills were registered on the sharded model and saved with the gathered adapter
    library = json.loads((two / "final" / "skill_library.json").read_text())
    assert [skill["name"] for skill in library["skills"]] == ["code_alpaca", "mbpp"]


def test_gathered_adapter_gives_the_sharded_models_logits_in_one_process(fsdp_run, tmp_path):
    two = fsdp_run[0]
    model = DyLoRAMoEForCausalLM.from_pretrained(two / "final", make_base("llama"))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])).logits
    for rank in (0, 1):
        torch.testing.assert_close(logits, torch.load(two / f"rank{rank}.pt")["logits"], rtol=1e-5, atol=1e-5)
    exported = model.export_expert(0, tmp_path / "expert0")  # and it exports as a PEFT adapter, as before
    assert (exported / "adapter_config.json").is_file()


def test_sharded_checkpoints_are_complete_and_resume_under_one_process(fsdp_run, tmp_path, tiny_data):
    two = fsdp_run[0]
    checkpoint = two / "checkpoint-3"
    verify_checkpoint(checkpoint)
    manifest = json.loads((checkpoint / "manifest.json").read_text())["files"]
    assert any(name.startswith(f"{SHARDED_DIR}/") for name in manifest) and "optimizer.pt" not in manifest
    assert not list(two.glob(".checkpoint-*.tmp-*"))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / checkpoint.name)
    JointTrainer(config_for(resumed, tiny_data, accum=2, resume=True), *tiny_model_and_tokenizer()).train()
    assert_same_adapter(adapter(resumed), adapter(two))
    assert losses(resumed)[3:] == pytest.approx(losses(two)[3:], rel=1e-5)


def test_killed_after_step_3_resumes_to_the_uninterrupted_end(fsdp_run, tmp_path):
    two, data, _ = fsdp_run
    config = config_for(tmp_path / "killed", data, accum=1, **{"train.distributed": "fsdp"})
    done = launch(config, tmp_path, SCRIPT, "3", check=False)
    assert done.returncode != 0
    assert [p.name for p in sorted((tmp_path / "killed").glob("checkpoint-*"))] == [
        "checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert not (tmp_path / "killed" / "final").exists()
    launch(config.replace(resume=True), tmp_path, SCRIPT, "0")
    assert_same_adapter(adapter(tmp_path / "killed"), adapter(two), tol=1e-6)
    assert losses(tmp_path / "killed") == pytest.approx(losses(two), rel=1e-6)


def test_bad_launches_fail_at_the_start_and_write_nothing(tmp_path, tiny_data):
    one = config_for(tmp_path / "out", tiny_data, accum=1, **{"train.distributed": "fsdp"})
    with pytest.raises(ConfigError, match="train.distributed=fsdp .* 1 process.*torchrun --nproc_per_node"):
        JointTrainer(one, *tiny_model_and_tokenizer()).train()
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=r"global_batch_size=6 is not a multiple of 2 process\(es\) x "
                                          r"train.per_device_batch_size 2 = 4"):
        resolve_accumulation("fsdp", 2, 2, 1, 6, True)
    assert resolve_accumulation("ddp", 2, 2, 7, 8, True) == 2 and resolve_accumulation("ddp", 1, 2, 7, 0, False) == 7
    # launched for real: two processes, a global batch they do not divide
    bad = config_for(tmp_path / "bad", tiny_data, accum=1, **{"train.distributed": "fsdp",
                                                             "train.global_batch_size": 6})
    done = launch(bad, tmp_path, SCRIPT, "0", check=False)
    assert done.returncode != 0 and "global_batch_size=6 is not a multiple of 2" in done.stderr
    assert not (tmp_path / "bad").exists()


def test_a_global_batch_size_sets_the_accumulation(tmp_path, tiny_data):
    config = config_for(tmp_path / "run", tiny_data, accum=1, **{"train.global_batch_size": 4, "train.max_steps": 1})
    trainer = JointTrainer(config, *tiny_model_and_tokenizer())
    trainer.train()
    assert trainer.config.train.gradient_accumulation_steps == 2
    saved = TrainConfig.from_json_file(tmp_path / "run" / "train_config.json")
    assert saved.train.gradient_accumulation_steps == 2 and saved.train.global_batch_size == 4


def test_token_routing_with_shared_a_sharded_equals_one_process(tmp_path, tiny_data):
    """The default routing (per token, every expert in every step's graph) and HydraLoRA's shared A (one A per
    module, sharded like the rest) under FSDP: the same losses and adapter as one process."""
    changes = {"moe.routing": "token", "moe.shared_a": True, "train.max_steps": 3, "train.save_every": 0}
    two = config_for(tmp_path / "two", tiny_data, accum=1, **{"train.distributed": "fsdp", **changes})
    launch(two, tmp_path, SCRIPT, "0")
    JointTrainer(config_for(tmp_path / "one", tiny_data, accum=2, **changes), *tiny_model_and_tokenizer()).train()
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "two")), torch.tensor(losses(tmp_path / "one")),
                               rtol=1e-5, atol=1e-5)
    assert_same_adapter(adapter(tmp_path / "two"), adapter(tmp_path / "one"))

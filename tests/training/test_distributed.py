"""Two CPU processes (gloo, launched with torchrun) against one process with the same global batch.

The same tiny llama and data; dropout off so that both runs are deterministic. Sparse top-1 routing
leaves experts without gradient in a step; DDP is told (``find_unused_parameters``) and must still
match the single process. Checks: both ranks hold identical parameters, they equal the single-process
run's within float tolerance, the held-out losses (reduced across processes) agree, and a checkpoint
written under 2 processes resumes under 1 process to the same end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dylora_moe.training import JointTrainer, TrainConfig

from . import isolate_data_registry, tiny_config, tiny_model_and_tokenizer, write_data_dir

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = textwrap.dedent('''
    import sys, torch
    from dylora_moe.training import JointTrainer, TrainConfig
    from tests.training import tiny_model_and_tokenizer
    config = TrainConfig.from_json_file(sys.argv[1])
    trainer = JointTrainer(config, *tiny_model_and_tokenizer())
    trainer.train()
    rank = trainer.accelerator.process_index
    params = {n: p.detach().cpu() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
              if p.requires_grad}
    torch.save(params, f"{config.output_dir}/params_rank{rank}.pt")
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    isolate_data_registry(monkeypatch)
    return write_data_dir(tmp_path / "data")


def config_for(out: Path, data_dir: Path, accum: int, **changes) -> TrainConfig:
    return tiny_config(out, data_dir, **{"moe.dropout": 0.0, "train.per_device_batch_size": 2,
                                         "train.gradient_accumulation_steps": accum, "train.max_steps": 4,
                                         "train.eval_every": 2, "train.save_every": 2, "train.save_total_limit": 0,
                                         **changes})


def launch(config: TrainConfig, tmp_path: Path, script: str = SCRIPT, *args: str, check: bool = True,
           processes: int = 2) -> subprocess.CompletedProcess:
    """Run ``script`` (with the config's JSON file and ``args``) under torchrun on CPU processes (gloo)."""
    path = tmp_path / f"run_{abs(hash(script))}.py"
    path.write_text(script)
    config_path = tmp_path / f"{Path(config.output_dir).name}.json"
    config.to_json_file(config_path)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(path), str(config_path), *args]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    (tmp_path / "launch.stderr").write_text(done.stderr)
    if check:
        rank0 = "\n".join(line for line in done.stderr.splitlines() if line.startswith("[rank0]"))
        assert done.returncode == 0, done.stdout[-2000:] + (rank0[-5000:] or done.stderr[-5000:])
    return done


def trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.exact
@pytest.mark.parametrize("changes", [{}, {"moe.domain_mi_coef": 0.5, "moe.domain_mi_decay": 0.9}],
                         ids=["plain", "running-domain-statistics"])
def test_two_processes_match_one_and_resume_under_one(tmp_path, data_dir, changes):
    # with the domain routing loss's running statistics, each step's sums are reduced over the processes
    two = config_for(tmp_path / "two", data_dir, accum=1, **changes)
    launch(two, tmp_path)
    rank0 = torch.load(tmp_path / "two" / "params_rank0.pt")
    rank1 = torch.load(tmp_path / "two" / "params_rank1.pt")
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)

    single_trainer = JointTrainer(config_for(tmp_path / "one", data_dir, accum=2, **changes),
                                  *tiny_model_and_tokenizer())
    single = single_trainer.train()
    ours = trained(single_trainer.model)
    assert ours.keys() == rank0.keys()
    moved = [k for k in ours if not torch.equal(ours[k], tiny_start()[k])]
    assert moved, "training changed nothing"
    for k in ours:
        torch.testing.assert_close(rank0[k], ours[k], rtol=1e-4, atol=1e-5)
    # held-out losses were reduced across the two processes: they equal the single process's
    import json

    two_metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for domain, loss in single.metrics["eval_loss"]["end"].items():
        assert two_metrics["eval_loss"]["end"][domain] == pytest.approx(loss, rel=1e-4)
    assert two_metrics["world_size"] == 2
    if changes:
        joints = [json.loads((tmp_path / run / "checkpoint-4" / "trainer_state.json").read_text())["domain_routing"]
                  ["joint"] for run in ("two", "one")]
        torch.testing.assert_close(torch.tensor(joints[0]), torch.tensor(joints[1]), rtol=1e-5, atol=1e-6)
        assert torch.tensor(joints[0]).sum() > 0

    # a 2-process checkpoint resumes under 1 process (same global batch: accumulation 2)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed_dir)
    for extra in ("checkpoint-4", "final", "metrics.json"):
        target = resumed_dir / extra
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    resumer = JointTrainer(config_for(resumed_dir, data_dir, accum=2, resume=True, **changes),
                           *tiny_model_and_tokenizer())
    resumer.train()
    after = trained(resumer.model)
    for k in after:
        torch.testing.assert_close(after[k], rank0[k], rtol=1e-4, atol=1e-5)


def tiny_start() -> dict[str, torch.Tensor]:
    from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
    from tests.tiny import make_base

    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=2, r=4, alpha=8, dropout=0.0),
                                 mature=True)
    return trained(model)


def test_resume_with_another_global_batch_is_refused(tmp_path, data_dir):
    first = config_for(tmp_path / "run", data_dir, accum=2, **{"train.max_steps": 2})
    JointTrainer(first, *tiny_model_and_tokenizer()).train()
    again = config_for(tmp_path / "run", data_dir, accum=1, resume=True, **{"train.max_steps": 4})
    from dylora_moe import CheckpointError

    with pytest.raises(CheckpointError, match="4 sequences per optimizer step .* now 2 .* "
                                              "train.gradient_accumulation_steps=2"):
        JointTrainer(again, *tiny_model_and_tokenizer()).train()


@pytest.mark.parametrize("name,kind,processes", [("ddp", "MULTI_GPU", 4), ("deepspeed_zero2", "DEEPSPEED", 4)])
def test_example_accelerate_configs_are_valid(name, kind, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.name == kind and config.num_processes == processes


def test_accelerates_fsdp_engine_is_refused_before_any_work_with_a_pointer_to_ours(tmp_path, data_dir, monkeypatch):
    """Accelerate's FSDP engine would shard the model a second way (and save the main process's shard only): the
    trainer stops at the start, naming train.distributed=fsdp, and writes nothing."""
    from accelerate.utils import DistributedType

    from dylora_moe.training import TrainingError, trainer

    trainer.check_engine(str(DistributedType.MULTI_CPU))  # DDP engines pass
    trainer.check_engine(str(DistributedType.DEEPSPEED))
    pointer = "Accelerate's FSDP engine .*configs/accelerate/ddp.yaml or torchrun and set train.distributed=fsdp"
    with pytest.raises(TrainingError, match=pointer):
        trainer.check_engine(str(DistributedType.FSDP))
    original = trainer.JointTrainer._make_accelerator

    def as_fsdp(self):
        acc = original(self)
        monkeypatch.setattr(type(acc), "distributed_type", property(lambda _: DistributedType.FSDP))
        return acc

    monkeypatch.setattr(trainer.JointTrainer, "_make_accelerator", as_fsdp)
    with pytest.raises(TrainingError, match="FSDP"):
        JointTrainer(config_for(tmp_path / "run", data_dir, accum=1), *tiny_model_and_tokenizer()).train()
    assert not (tmp_path / "run").exists()

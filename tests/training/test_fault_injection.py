"""Fault injection: a tiny training run is SIGKILLed several times in a row -- at random moments and in the
middle of writing a checkpoint -- and resumed each time. The final parameters and the logged loss curve must
equal an uninterrupted run's exactly, and every checkpoint left on disk must verify and load."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dylora_moe import DyLoRAMoEForCausalLM
from dylora_moe.common.runs import ADAPTER_DIR, list_checkpoints
from dylora_moe.training.checkpoint import verify_checkpoint
from tests.tiny import make_base

from . import isolate_data_registry, tiny_config, write_data_dir

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys
from dylora_moe.training import JointTrainer, TrainConfig, list_checkpoints
from tests.training import tiny_model_and_tokenizer
config = TrainConfig.from_json_file(sys.argv[1])
config = config.replace(resume=bool(list_checkpoints(config.output_dir)))
JointTrainer(config, *tiny_model_and_tokenizer()).train()
"""
CURVE_KEYS = ("step", "loss", "lm_loss", "aux_loss", "lr", "grad_norm")


def start(script: Path, config: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(config)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 240.0) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` is true; False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    proc.kill()
    raise AssertionError("the training subprocess made no progress")


def writing_checkpoint(out: Path) -> bool:
    return any(p.name.startswith(".checkpoint-") and ".tmp-" in p.name for p in out.iterdir()) if out.exists() \
        else False


def check_every_checkpoint(out: Path) -> None:
    for ckpt in list_checkpoints(out):
        verify_checkpoint(ckpt)
        DyLoRAMoEForCausalLM.from_pretrained(ckpt / ADAPTER_DIR, base_model=make_base("llama"))


@pytest.mark.exact
def test_repeated_sigkill_and_resume_equal_an_uninterrupted_run(tmp_path, monkeypatch):
    isolate_data_registry(monkeypatch)
    data = write_data_dir(tmp_path / "data")
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    changes = {"train.max_steps": 10, "train.save_every": 1, "train.save_total_limit": 3, "train.eval_every": 5}

    reference_cfg = tmp_path / "reference.json"
    tiny_config(tmp_path / "reference", data, **changes).to_json_file(reference_cfg)
    done = start(script, reference_cfg)
    assert done.wait(timeout=300) == 0, done.stderr.read().decode()[-3000:]

    out = tmp_path / "faulty"
    faulty_cfg = tmp_path / "faulty.json"
    tiny_config(out, data, **changes).to_json_file(faulty_cfg)
    rng = random.Random(1234)
    kills = 0
    for attempt in range(5):
        proc = start(script, faulty_cfg)
        seen = len(list_checkpoints(out))
        if attempt % 2 == 0:  # in the middle of writing a checkpoint
            killed = kill_when(proc, lambda: writing_checkpoint(out))
        else:  # at a random moment once training is under way
            delay = rng.uniform(0.0, 0.4)
            killed = kill_when(proc, lambda seen=seen, delay=delay: len(list_checkpoints(out)) > seen
                               and (time.sleep(delay) or True))
        kills += killed
        check_every_checkpoint(out)
        if not killed:
            break
    assert kills >= 3, kills
    final = start(script, faulty_cfg)
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()[-3000:]
    check_every_checkpoint(out)

    ours = load_file(str(out / "final" / "dylora_moe_weights.safetensors"))
    theirs = load_file(str(tmp_path / "reference" / "final" / "dylora_moe_weights.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    curve = [{k: r.get(k) for k in CURVE_KEYS} for r in json.loads((out / "metrics.json").read_text())["train_log"]]
    expected = [{k: r.get(k) for k in CURVE_KEYS}
                for r in json.loads((tmp_path / "reference" / "metrics.json").read_text())["train_log"]]
    assert curve == expected and [r["step"] for r in curve] == list(range(1, 11))
    evals = json.loads((out / "metrics.json").read_text())["eval_loss"]
    assert evals == json.loads((tmp_path / "reference" / "metrics.json").read_text())["eval_loss"]


"""Memory per process of sharded training (``train.distributed=fsdp``) against one process holding everything.

For each number of processes N in ``--processes`` the script launches ``torchrun --nproc_per_node N`` on this
script's worker (one process: the plain trainer, N >= 2: FSDP2), which sets up ``JointTrainer`` on
``--config`` (default: the CPU demo on SmolLM2-135M), trains ``--steps`` optimizer steps on the same global
batch (``train.global_batch_size``), and reports, per rank:

* the bytes of the frozen base, of the trainable adapter and of the optimizer state that the rank holds (its
  shards: what sharding divides, counted exactly);
* the process's resident memory after setup (free heap pages handed back first) and its peak during the steps
  (CPU: ``VmRSS`` / ``VmHWM``; CUDA: the allocator's current and peak bytes), which also hold the libraries,
  the activations and the gathered blocks;
* the median step time (processes beyond the cores are oversubscribed: not a speed figure).

CPU (gloo), as recorded in docs/distributed.md::

    python benchmarks/fsdp_memory.py --processes 1 2 4 --steps 2 --json fsdp-memory.json

One GPU machine with several GPUs (nccl, bf16), one short command when such a machine is lent::

    python benchmarks/fsdp_memory.py --device cuda --processes 1 2 4 --steps 5 \\
        --set train.precision=bf16 train.per_device_batch_size=8 --json fsdp-gpu.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def _held_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def _memory(device) -> tuple[float | None, float | None]:
    """(current, peak since the last reset) in MiB."""
    import torch

    from dylora_moe.common.memory import peak_memory_bytes, rss_bytes

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MIB, torch.cuda.max_memory_allocated(device) / MIB
    now, peak = rss_bytes(), peak_memory_bytes(device)
    return (None if now is None else now / MIB), (None if peak is None else peak / MIB)


def _return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim``): each process read the whole base
    before sharding it, and the allocator keeps freed pages mapped, so without this the resident set after setup
    still counts the freed full copy (the pages are reused for activations either way)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def worker(config_path: str, overrides: list[str], steps: int, out: str) -> None:
    """One process of the measurement (run by torchrun)."""
    import torch

    from dylora_moe.common.memory import reset_peak_memory
    from dylora_moe.training import JointTrainer, TrainConfig

    config = TrainConfig.from_yaml(config_path, overrides)
    trainer = JointTrainer(config)
    state = trainer.setup()
    acc = trainer.accelerator
    model = state.model
    frozen = [p for p in model.parameters() if not p.requires_grad]
    _return_freed_memory()
    after_setup, _ = _memory(acc.device)
    reset_peak_memory(acc.device)
    times, start = [], time.perf_counter()
    for batch in trainer.batches(state):
        if trainer.step(state, batch):
            times.append(time.perf_counter() - start)
            start = time.perf_counter()
            if state.step >= steps:
                break
    _, peak = _memory(acc.device)
    optimizer = getattr(state.optimizer, "optimizer", state.optimizer)
    opt_tensors = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    row = {"rank": acc.process_index, "processes": acc.num_processes, "engine": config.train.distributed,
           "base_mib": _held_bytes(frozen) / MIB, "adapter_mib": _held_bytes(model.trainable_parameters()) / MIB,
           "optimizer_mib": _held_bytes(opt_tensors) / MIB, "memory_after_setup_mib": after_setup,
           "peak_memory_steps_mib": peak, "median_step_s": statistics.median(times) if times else None,
           "device": str(acc.device)}
    trainer.close(state)
    Path(out).write_text(json.dumps(row) + "\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(processes: int, args: argparse.Namespace, work: Path) -> list[dict]:
    engine = "ddp" if processes == 1 else "fsdp"
    out = work / f"n{processes}"
    overrides = [f"output_dir={out}/run", "overwrite_output_dir=true", f"train.distributed={engine}",
                 f"train.per_device_batch_size={args.per_device}", f"train.global_batch_size={args.global_batch}",
                 f"train.max_steps={args.steps}",
                 "train.eval_every=0", "train.save_every=0", "train.report_to=[]",
                 "train.router_calibration_examples=16", *args.set]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if args.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // processes)))
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), __file__, "--worker", "--config", args.config,
           "--steps", str(args.steps), "--out", str(out / "rank{rank}.json"), "--set", *overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{processes} process(es) failed:\n{done.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "cpu-demo.yaml"))
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step, all processes")
    parser.add_argument("--per-device", type=int, default=2, help="sequences per micro-batch and process")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. train.precision=bf16")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        rank = os.environ.get("RANK", "0")
        worker(args.config, args.set, args.steps, args.out.format(rank=rank))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.processes:
            rows += measure(n, args, Path(tmp))
    base_one = next((r["base_mib"] for r in rows if r["processes"] == 1), None)
    print(f"{'procs':>5} {'rank':>4} {'engine':>6} {'base MiB':>9} {'share':>6} {'adapter':>8} {'optim':>7} "
          f"{'mem setup':>10} {'peak steps':>10} {'s/step':>7}")
    for r in rows:
        share = f"{r['base_mib'] / base_one:.3f}" if base_one else "-"
        mem = [f"{v:.0f}" if v is not None else "-" for v in (r["memory_after_setup_mib"], r["peak_memory_steps_mib"])]
        step = f"{r['median_step_s']:.2f}" if r["median_step_s"] is not None else "-"
        print(f"{r['processes']:>5} {r['rank']:>4} {r['engine']:>6} {r['base_mib']:>9.1f} {share:>6} "
              f"{r['adapter_mib']:>8.2f} {r['optimizer_mib']:>7.2f} {mem[0]:>10} {mem[1]:>10} {step:>7}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

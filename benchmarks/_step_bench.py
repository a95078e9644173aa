"""Shared parts of the training-step benchmarks (``train_step.py``, ``designs_step.py``, ``supervised_head.py``).

Timing runs in the plain process a user trains in: no allocator setting, the default thread count. Peak
memory is measured apart, in one child process per variant (:func:`memory_in_children`) started with
``MALLOC_MMAP_THRESHOLD_`` set, so that freed buffers leave the resident set and its high-water mark means
something; that setting slows every variant (17-41% on the default model), so it never touches the timing.
Not a script of its own: the benchmarks import it.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from dylora_moe import load_base_model
from dylora_moe.common.memory import rss_bytes

#: the environment of the memory children: large buffers go straight to mmap, so freed memory leaves the RSS
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def tiny_llama():
    """``LlamaConfig(hidden 512, 4 layers, 8 heads, 4 KV heads, intermediate 1376, vocab 8192)``, seed 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=8192, max_position_embeddings=512)
    return LlamaForCausalLM(cfg)


def load(name: str, dtype: torch.dtype, device: str):
    """The base model ``name`` ('tiny-llama', 'smollm2-135m' or a hub id / folder) on ``device`` in ``dtype``."""
    model = tiny_llama() if name == "tiny-llama" else load_base_model(name)[0]
    return model.to(device=device, dtype=dtype)


def make_batch(vocab: int, device: str, batch: int, seq: int, supervised: float = 0.75) -> dict[str, torch.Tensor]:
    """Random ids ``[batch, seq]``; the first ``1 - supervised`` of each row is a -100 prompt."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    labels = ids.clone()
    labels[:, : seq - round(seq * supervised)] = -100
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": labels.to(device)}


def step_fn(model, batch, **forward_kwargs) -> Callable[[], None]:
    """One training step of ``model`` as a user's loop runs it: ``model(**batch).loss.backward()``, fused AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)  # as `dylora-moe train` and transformers' Trainer run it
    model.train()

    def step() -> None:
        out = model(**batch, **forward_kwargs)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def floor_step(base, batch) -> Callable[[], None]:
    """The floor every adapter method pays: forward + backward of the frozen ``base`` with gradients only to its
    input embeddings (the whole backward through the network, no adapter, no optimizer)."""
    for p in base.parameters():
        p.requires_grad_(False)
    embedding = base.get_input_embeddings()
    base.train()

    def step() -> None:
        embeds = embedding(batch["input_ids"]).detach().requires_grad_(True)
        out = base(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()

    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def trim() -> None:
    """Collect garbage and hand freed heap memory back to the system."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def interleaved_times(steps: dict, repeats: int, device: str, label: str = "") -> dict[str, list[float]]:
    """Seconds of each call of every step, ``repeats`` rounds, each round calling every step once in turn (so
    machine noise hits them alike); prints each round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(repeats):
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        print(f"  {label}round {r + 1}/{repeats}: " + ", ".join(f"{n}={t[-1]:.3f}s" for n, t in times.items()),
              flush=True)
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> tuple[float, float] | None:
    """(median of ``a`` / median of ``b``, median of the within-round ratios) or None if one did not run."""
    if a not in times or b not in times:
        return None
    med = statistics.median(times[a]) / statistics.median(times[b])
    paired = statistics.median(x / y for x, y in zip(times[a], times[b]))
    return round(med, 4), round(paired, 4)


def peak_step_memory(make_step: Callable[[], Callable[[], None]], base, device: str) -> int:
    """Peak bytes of two calls of the step ``make_step()`` builds (optimizer state exists in the second), above
    the base model (the deep copy each variant makes of it is subtracted). On CPU, meaningful only in a process
    started with :data:`MEMORY_ENV` (see :func:`memory_in_children`)."""
    trim()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = rss_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    step = make_step()
    for _ in range(2):
        step()
    sync(device)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else rss_bytes("VmHWM")
    del step
    trim()
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    return max(peak - before - base_bytes, 0)


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # child mode: measure this variant only
    parser.add_argument("--memory-json", help=argparse.SUPPRESS)


def memory_in_children(script: str, argv: list[str], names: Iterable[str]) -> dict[str, int]:
    """Peak step memory of each variant in ``names``, each measured by a child process running ``script`` with
    ``argv --memory-of NAME`` under :data:`MEMORY_ENV` (the timing process is never slowed by it)."""
    result = {}
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "memory.json"
            cmd = [sys.executable, script, *argv, "--memory-of", name, "--memory-json", str(out)]
            proc = subprocess.run(cmd, env={**os.environ, **MEMORY_ENV}, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"memory run of {name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
            result[name] = int(json.loads(out.read_text())["peak_step_bytes"])
        print(f"  peak step memory of {name}: {result[name] / 2**20:.0f} MiB", flush=True)
    return result


def write_child_memory(path: str, peak: int) -> int:
    Path(path).write_text(json.dumps({"peak_step_bytes": peak}))
    return 0


def parse_step_arguments(parser: argparse.ArgumentParser, argv, variants, json_help: str) -> argparse.Namespace:
    """The options every step benchmark shares (variants, batch, length, repeats, device, dtype, JSON output,
    memory runs), added to ``parser`` and parsed from ``argv``; ``args.dtype`` is a torch dtype, ``args.variants``
    a list, ``args.argv`` the arguments as given (for the memory children)."""
    parser.add_argument("--variants", default=",".join(variants))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", help=json_help)
    add_memory_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = [a for a in argv if a not in ("--no-memory",)]
    args.dtype = getattr(torch, args.dtype)
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in variants]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {', '.join(variants)}")
    return args

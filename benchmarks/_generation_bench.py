"""Shared plumbing of the generation benchmarks (``generation.py``, ``prompt_routing.py``, ``batch_fill.py``):
their common command-line options, loading the checkpoint, and timing two sides interleaved in one process.

Not a benchmark itself; each script says what it compares and how to run it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dylora_moe.evaluation.harness import load_for_eval, resolve_device  # noqa: E402


def parser(doc: str, problems: int, problems_help: str, max_new_tokens: int, repeats: int) -> argparse.ArgumentParser:
    """The options every generation benchmark takes; a script adds its own."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/cpu-demo/final", help="DyLoRA-MoE checkpoint folder")
    p.add_argument("--problems", type=int, default=problems, help=problems_help)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--repeats", type=int, default=repeats, help="interleaved rounds (before, after) x repeats")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--data-dir", default=None, help="folder holding mbpp/mbpp.jsonl")
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """The checkpoint of ``--checkpoint`` on ``--device`` (eval mode), with ``--threads`` applied."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_for_eval(args.checkpoint, device=resolve_device(args.device))
    return model.eval(), tokenizer


def timed(model: Any, run: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, run())``, synchronising the GPU on both ends when the model is on one."""
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = run()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started, out


def interleaved(model: Any, sides: dict[str, Callable[[], Any]], repeats: int
                ) -> tuple[dict[str, list[float]], dict[str, float], dict[str, Any]]:
    """Run every side once per round, ``repeats`` rounds, printing each time; returns the seconds per side,
    their medians and each side's last output."""
    times: dict[str, list[float]] = {side: [] for side in sides}
    outputs: dict[str, Any] = {}
    for _ in range(repeats):
        for side, run in sides.items():
            seconds, outputs[side] = timed(model, run)
            times[side].append(seconds)
            print(f"{side}: {seconds:.2f} s", flush=True)
    return times, {side: statistics.median(values) for side, values in times.items()}, outputs


def finish(args: argparse.Namespace, result: dict[str, Any], line: str) -> int:
    """Print the summary line, write ``--json`` when asked; the script's exit status."""
    print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0

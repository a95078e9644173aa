"""Where a training step's time goes: torch.profiler's operator table for one variant of ``train_step.py``.

Builds the variant (``floor``, ``lora``, ``default``, ``sequence``, ``moe8``, ...: see ``train_step.py``) on the
given model, runs ``--warmup`` steps, then profiles ``--steps`` steps and prints the operators by self CPU time
(``--top`` rows). ``--no-profiler`` only runs the steps, for a sampling profiler outside the process; the flame
graph in docs/benchmarks.md was made so (py-spy is not a dependency: ``pip install py-spy``)::

    python benchmarks/profile_step.py --variant default --steps 2
    py-spy record -r 50 -f flamegraph -o docs/images/train-step-default.svg -- \\
        python benchmarks/profile_step.py --variant default --steps 6 --no-profiler
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _step_bench import load, make_batch
from train_step import VARIANTS, make_step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variant", default="default", choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-profiler", action="store_true")
    args = parser.parse_args(argv)
    base = load(args.model, torch.float32, "cpu")
    batch = make_batch(base.config.vocab_size, "cpu", args.batch, args.seq)
    with tempfile.TemporaryDirectory() as tmp:
        step = make_step(args.variant, base, batch, Path(tmp))
        for _ in range(args.warmup):
            step()
        if args.no_profiler:
            for _ in range(args.steps):
                step()
            return 0
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
    print(f"{args.variant} on {args.model}, {args.steps} steps of batch {args.batch} x {args.seq}:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

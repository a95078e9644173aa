"""Generation batches that end early when one long prompt would pad the whole batch (``min_fill``), against
plain fixed-size batches.

Evaluation generates prompts longest first, ``batch_size`` at a time, left-padded to the batch's longest
prompt. One outlier (MBPP/493: 1781 prompt tokens in chat style, the next longest 242) made every row of
the first batch carry 1781 positions through prefill and every decoding step. With ``min_fill=0.5`` a
batch ends early when its real prompt tokens would fill less than half of ``rows x longest``.

Two sides, interleaved in one process (so machine noise hits both alike), through
:func:`dylora_moe.evaluation.generate_samples` on the ``--problems`` longest MBPP test prompts:

* ``before``: ``min_fill=0`` (fixed-size batches, what evaluation did until this change);
* ``after``: ``min_fill=0.5`` (today's default).

It prints the padded prompt tokens of each side's batches, the median seconds per side,
``after_vs_before`` (lower is better) and whether both sides gave identical replies.

Run (any DyLoRA-MoE checkpoint; the README's main job by default)::

    python benchmarks/batch_fill.py --checkpoint runs/cpu-demo/final --problems 8 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dylora_moe.evaluation import generation  # noqa: E402
from dylora_moe.evaluation.benchmarks import load_problems  # noqa: E402
from dylora_moe.evaluation.harness import load_for_eval, resolve_device  # noqa: E402


def run_side(model, tokenizer, problems, config) -> tuple[float, list[str]]:
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    samples = generation.generate_samples(model, tokenizer, problems, config)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started, [s.completion for s in samples]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/cpu-demo/final", help="DyLoRA-MoE checkpoint folder")
    parser.add_argument("--problems", type=int, default=8, help="the N longest MBPP test prompts")
    parser.add_argument("--batch-size", type=int, default=None, help="default: all N in one batch")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds (before, after) x repeats")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--data-dir", default=None, help="folder holding mbpp/mbpp.jsonl")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_for_eval(args.checkpoint, device=resolve_device(args.device))
    model.eval()
    style = generation.resolve_prompt_style(tokenizer)
    every = load_problems("mbpp", data_dir=args.data_dir)
    length = {p.task_id: len(tokenizer(generation.render_prompt(p, tokenizer, style))["input_ids"]) for p in every}
    problems = sorted(every, key=lambda p: -length[p.task_id])[: args.problems]
    lengths = [length[p.task_id] for p in problems]
    batch_size = args.batch_size or len(problems)
    sides = {"before": 0.0, "after": generation.GenerationConfig().min_fill}
    configs = {side: generation.GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=batch_size,
                                                 min_fill=fill) for side, fill in sides.items()}
    padded = {side: sum(len(b) * lengths[b[0]] for b in generation.plan_batches(
        list(range(len(problems))), lengths, batch_size, fill)) for side, fill in sides.items()}
    print(f"prompt tokens {sum(lengths)} (longest {lengths[0]}); padded: before {padded['before']}, "
          f"after {padded['after']}", flush=True)
    warm = generation.GenerationConfig(max_new_tokens=2, batch_size=4)
    run_side(model, tokenizer, problems[-4:], warm)  # one-off costs (allocator, kernels): not timed
    times: dict[str, list[float]] = {side: [] for side in sides}
    replies: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for side in sides:
            seconds, replies[side] = run_side(model, tokenizer, problems, configs[side])
            times[side].append(seconds)
            print(f"{side}: {seconds:.2f} s", flush=True)
    median = {side: statistics.median(values) for side, values in times.items()}
    same = sum(a == b for a, b in zip(replies["before"], replies["after"]))
    result = {
        "device": str(next(model.parameters()).device), "problems": len(problems), "batch_size": batch_size,
        "prompt_tokens": sum(lengths), "padded_prompt_tokens": padded, "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats, "seconds": times, "median_s": median,
        "after_vs_before": median["after"] / median["before"], "identical_replies": f"{same}/{len(problems)}",
    }
    print(f"median s: before {median['before']:.2f}, after {median['after']:.2f}; "
          f"after_vs_before = {result['after_vs_before']:.3f}; identical replies {result['identical_replies']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

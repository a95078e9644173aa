"""Batched generation cost of the evaluation pipeline: today's code against its earlier per-step work.

Generates greedy replies for the first ``--problems`` MBPP test problems with a DyLoRA-MoE checkpoint
(sequence routing), in one batch, through :func:`dylora_moe.evaluation.generate_samples`, on two sides
that run interleaved in the same process (so machine noise hits both alike):

* ``before``: the per-step work the pipeline used to do. Every adapted layer gathers a copy of each
  row's expert matrices (the training path), and the stop check decodes every unfinished reply in full
  at every step (an unbounded tail window);
* ``after``: today's defaults: rows grouped by expert, two matmuls per chosen expert (no autograd), and
  a stop check that decodes only each row's newest tokens.

It prints the median seconds per side, ``after_vs_before`` (lower is better) and whether both sides
produced identical replies (they must: greedy decoding, the same numbers up to float rounding).

The stop check alone is also timed at evaluation scale, without a model: ``--stop-rows`` replies
(default 256, the GPU batch) growing token by token to ``--stop-steps`` tokens (default 512), none of
them finishing (the worst case, as when degenerate rows run to the length cap), with the checkpoint's
tokenizer; ``stop_after_vs_before`` is the ratio of the two sides' total time.

Run (the checkpoint is the README's main job; any DyLoRA-MoE checkpoint works)::

    python benchmarks/generation.py --checkpoint runs/cpu-demo/final --problems 32 --max-new-tokens 64
    python benchmarks/generation.py --checkpoint runs/cpu-demo/final --device cuda --problems 256 \\
        --max-new-tokens 512
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _generation_bench as bench  # noqa: E402

from dylora_moe import experts  # noqa: E402
from dylora_moe.evaluation import generation  # noqa: E402
from dylora_moe.evaluation.benchmarks import load_problems  # noqa: E402


def _gathered(x, groups, gates, a_list, b_list):
    """The earlier inference path: each row gathers a copy of its experts' A and B (as in training)."""
    key = id(groups)
    if key not in _CHOSEN:
        batch, k = gates.shape
        chosen = [[0] * k for _ in range(batch)]
        for expert, (rows, slots) in groups.items():
            for row, slot in zip(range(batch) if rows is None else rows.tolist(), slots.tolist()):
                chosen[row][slot] = expert
        _CHOSEN[key] = (groups, chosen)  # groups kept alive: its id stays unique while cached
    return experts._sparse_per_sequence(x, _CHOSEN[key][1], gates, a_list, b_list)


_CHOSEN: dict[int, tuple] = {}


@contextmanager
def before_side():
    """The earlier per-step work: per-row gather of expert matrices, full decode of every reply each step."""
    saved = experts._grouped_per_sequence, generation._StopCriteria.WINDOW
    experts._grouped_per_sequence, generation._StopCriteria.WINDOW = _gathered, 10**9
    try:
        yield
    finally:
        experts._grouped_per_sequence, generation._StopCriteria.WINDOW = saved
        _CHOSEN.clear()


def replies(name: str, model, tokenizer, problems, config) -> list[str]:
    if name == "before":
        with before_side():
            samples = generation.generate_samples(model, tokenizer, problems, config)
    else:
        samples = generation.generate_samples(model, tokenizer, problems, config)
    return [s.completion for s in samples]


def time_stop_check(tokenizer, rows: int, steps: int) -> dict[str, float]:
    """Seconds of the stop check over ``rows`` replies growing to ``steps`` tokens, full decode vs tail window."""
    generator = torch.Generator().manual_seed(0)
    vocab = min(len(tokenizer), 30000)
    ids = torch.randint(100, vocab, (rows, steps), generator=generator)
    done, _ = generation._stop_test("chat", "mbpp")
    never = "\x00never\x00"  # no row finishes: every step checks every row
    seconds = {}
    for side, window in (("before", 10**9), ("after", generation._StopCriteria.WINDOW)):
        criteria = generation._StopCriteria(tokenizer, 0, done, (never,))
        criteria.WINDOW = window
        started = time.perf_counter()
        for length in range(1, steps + 1):
            criteria(ids[:, :length])
        seconds[f"{side}_s"] = time.perf_counter() - started
    seconds["stop_after_vs_before"] = seconds["after_s"] / seconds["before_s"]
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = bench.parser(__doc__, 32, "MBPP test problems, all in one batch", 64, 2)
    parser.add_argument("--stop-rows", type=int, default=256, help="rows of the stop-check timing")
    parser.add_argument("--stop-steps", type=int, default=512, help="tokens per row of the stop-check timing")
    args = parser.parse_args(argv)
    model, tokenizer = bench.load(args)
    problems = load_problems("mbpp", limit=args.problems, data_dir=args.data_dir)
    config = generation.GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=len(problems))
    warm = generation.GenerationConfig(max_new_tokens=8, batch_size=len(problems))
    for side in ("before", "after"):  # first calls pay one-off costs (allocator, kernels): not timed
        replies(side, model, tokenizer, problems, warm)
    times, median, outputs = bench.interleaved(
        model, {side: (lambda side=side: replies(side, model, tokenizer, problems, config))
                for side in ("before", "after")}, args.repeats)
    stop = time_stop_check(tokenizer, args.stop_rows, args.stop_steps)
    same = sum(a == b for a, b in zip(outputs["before"], outputs["after"]))
    result = {
        "device": str(next(model.parameters()).device), "problems": len(problems),
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "seconds": times,
        "median_s": median, "after_vs_before": median["after"] / median["before"],
        "identical_replies": f"{same}/{len(problems)}",
        "stop_check": stop,
    }
    return bench.finish(args, result, (
        f"median s: before {median['before']:.2f}, after {median['after']:.2f}; "
        f"after_vs_before = {result['after_vs_before']:.3f}; identical replies {result['identical_replies']}\n"
        f"stop check, {args.stop_rows} rows x {args.stop_steps} steps: before {stop['before_s']:.2f} s, after "
        f"{stop['after_s']:.2f} s; stop_after_vs_before = {stop['stop_after_vs_before']:.3f}"))


if __name__ == "__main__":
    sys.exit(main())

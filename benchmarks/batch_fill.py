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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _generation_bench as bench  # noqa: E402

from dylora_moe.evaluation import generation  # noqa: E402
from dylora_moe.evaluation.benchmarks import load_problems  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = bench.parser(__doc__, 8, "the N longest MBPP test prompts", 32, 2)
    parser.add_argument("--batch-size", type=int, default=None, help="default: all N in one batch")
    args = parser.parse_args(argv)
    model, tokenizer = bench.load(args)
    style = generation.resolve_prompt_style(tokenizer)
    every = load_problems("mbpp", data_dir=args.data_dir)
    length = {p.task_id: len(tokenizer(generation.render_prompt(p, tokenizer, style))["input_ids"]) for p in every}
    problems = sorted(every, key=lambda p: -length[p.task_id])[: args.problems]
    lengths = [length[p.task_id] for p in problems]
    batch_size = args.batch_size or len(problems)
    fills = {"before": 0.0, "after": generation.GenerationConfig().min_fill}
    configs = {side: generation.GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=batch_size,
                                                 min_fill=fill) for side, fill in fills.items()}
    padded = {side: sum(len(b) * lengths[b[0]] for b in generation.plan_batches(
        list(range(len(problems))), lengths, batch_size, fill)) for side, fill in fills.items()}
    print(f"prompt tokens {sum(lengths)} (longest {lengths[0]}); padded: before {padded['before']}, "
          f"after {padded['after']}", flush=True)
    warm = generation.GenerationConfig(max_new_tokens=2, batch_size=4)
    generation.generate_samples(model, tokenizer, problems[-4:], warm)  # one-off costs: not timed

    def replies(side: str) -> list[str]:
        return [s.completion for s in generation.generate_samples(model, tokenizer, problems, configs[side])]

    times, median, outputs = bench.interleaved(model, {side: (lambda side=side: replies(side)) for side in fills},
                                               args.repeats)
    same = sum(a == b for a, b in zip(outputs["before"], outputs["after"]))
    result = {
        "device": str(next(model.parameters()).device), "problems": len(problems), "batch_size": batch_size,
        "prompt_tokens": sum(lengths), "padded_prompt_tokens": padded, "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats, "seconds": times, "median_s": median,
        "after_vs_before": median["after"] / median["before"], "identical_replies": f"{same}/{len(problems)}",
    }
    return bench.finish(args, result, (
        f"median s: before {median['before']:.2f}, after {median['after']:.2f}; "
        f"after_vs_before = {result['after_vs_before']:.3f}; identical replies {result['identical_replies']}"))


if __name__ == "__main__":
    sys.exit(main())

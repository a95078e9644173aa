"""Cost of recording each prompt's routing during evaluation: from generation's own prefill, against a separate
forward over the prompts.

Evaluation records, for every prompt, the expert the router chose and its distribution (``results.jsonl``'s
``expert`` and ``router_probs``). Two sides, run interleaved in the same process (so machine noise hits both
alike), through :func:`dylora_moe.evaluation.generate_samples` on the first ``--problems`` MBPP test problems:

* ``before``: a separate forward over each batch of prompts records the routing, then ``generate`` runs
  its own prefill over the same prompts (what the evaluation did until this change);
* ``after``: ``generate(on_prompt_routing=...)`` hands over the routing of its own prefill forward.

It prints the median seconds per side, ``after_vs_before`` (lower is better) and whether both sides gave
identical replies and identical recorded routing (they must). Short replies (``--max-new-tokens``) make the
prefill, which the change halves, a larger part of the time; full-length replies dilute it.

Run (any DyLoRA-MoE checkpoint; the README's main job by default)::

    python benchmarks/prompt_routing.py --checkpoint runs/cpu-demo/final --problems 16 --max-new-tokens 16
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _generation_bench as bench  # noqa: E402

from dylora_moe.evaluation import generation  # noqa: E402
from dylora_moe.evaluation.benchmarks import load_problems  # noqa: E402


@contextmanager
def separate_forward(model):
    """The earlier way: one forward over the prompts records their routing, then ``generate`` prefills again."""
    original = model.generate

    def generate(*args, on_prompt_routing=None, **kwargs):
        if on_prompt_routing is not None:
            with torch.no_grad():
                out = model(input_ids=kwargs["input_ids"], attention_mask=kwargs["attention_mask"], logits_to_keep=1)
            on_prompt_routing(out.expert_choice, out.router_probs)
        return original(*args, **kwargs)

    model.generate = generate
    try:
        yield
    finally:
        del model.generate  # back to the class's method


def samples(model, tokenizer, problems, config, before: bool) -> list:
    if before:
        with separate_forward(model):
            made = generation.generate_samples(model, tokenizer, problems, config)
    else:
        made = generation.generate_samples(model, tokenizer, problems, config)
    return [(s.completion, s.expert, s.router_probs) for s in made]


def main(argv: list[str] | None = None) -> int:
    args = bench.parser(__doc__, 16, "MBPP test problems, all in one batch", 16, 3).parse_args(argv)
    model, tokenizer = bench.load(args)
    problems = load_problems("mbpp", limit=args.problems, data_dir=args.data_dir)
    config = generation.GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=len(problems))
    warm = generation.GenerationConfig(max_new_tokens=2, batch_size=4)
    for before in (True, False):  # first calls pay one-off costs (allocator, kernels): not timed
        samples(model, tokenizer, problems, warm, before)
    times, median, outputs = bench.interleaved(model, {
        "before": lambda: samples(model, tokenizer, problems, config, True),
        "after": lambda: samples(model, tokenizer, problems, config, False)}, args.repeats)
    replies = sum(a[0] == b[0] for a, b in zip(outputs["before"], outputs["after"]))
    routes = sum(a[1] == b[1] and max(abs(p - q) for p, q in zip(a[2], b[2])) <= 1e-5
                 for a, b in zip(outputs["before"], outputs["after"]))
    result = {
        "device": str(next(model.parameters()).device), "routing": model.moe_config.routing,
        "problems": len(problems), "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "seconds": times, "median_s": median, "after_vs_before": median["after"] / median["before"],
        "identical_replies": f"{replies}/{len(problems)}", "identical_routing": f"{routes}/{len(problems)}",
    }
    return bench.finish(args, result, (
        f"median s: before {median['before']:.2f}, after {median['after']:.2f}; "
        f"after_vs_before = {result['after_vs_before']:.3f}; identical replies {result['identical_replies']}, "
        f"identical routing {result['identical_routing']}"))


if __name__ == "__main__":
    sys.exit(main())

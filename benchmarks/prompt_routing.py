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

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dylora_moe.evaluation import generation  # noqa: E402
from dylora_moe.evaluation.benchmarks import load_problems  # noqa: E402
from dylora_moe.evaluation.harness import load_for_eval, resolve_device  # noqa: E402


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


def run_side(name: str, model, tokenizer, problems, config) -> tuple[float, list]:
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    if name == "before":
        with separate_forward(model):
            samples = generation.generate_samples(model, tokenizer, problems, config)
    else:
        samples = generation.generate_samples(model, tokenizer, problems, config)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started, [(s.completion, s.expert, s.router_probs) for s in samples]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/cpu-demo/final", help="DyLoRA-MoE checkpoint folder")
    parser.add_argument("--problems", type=int, default=16, help="MBPP test problems, all in one batch")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (before, after) x repeats")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--data-dir", default=None, help="folder holding mbpp/mbpp.jsonl")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_for_eval(args.checkpoint, device=resolve_device(args.device))
    model.eval()
    problems = load_problems("mbpp", limit=args.problems, data_dir=args.data_dir)
    config = generation.GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=len(problems))
    for side in ("before", "after"):  # first calls pay one-off costs (allocator, kernels): not timed
        run_side(side, model, tokenizer, problems, generation.GenerationConfig(max_new_tokens=2, batch_size=4))
    times: dict[str, list[float]] = {"before": [], "after": []}
    outputs: dict[str, list] = {}
    for _ in range(args.repeats):
        for side in ("before", "after"):
            seconds, outputs[side] = run_side(side, model, tokenizer, problems, config)
            times[side].append(seconds)
            print(f"{side}: {seconds:.2f} s", flush=True)
    median = {side: statistics.median(values) for side, values in times.items()}
    replies = sum(a[0] == b[0] for a, b in zip(outputs["before"], outputs["after"]))
    routes = sum(a[1] == b[1] and max(abs(p - q) for p, q in zip(a[2], b[2])) <= 1e-5
                 for a, b in zip(outputs["before"], outputs["after"]))
    result = {
        "device": str(next(model.parameters()).device), "routing": model.moe_config.routing,
        "problems": len(problems), "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "seconds": times, "median_s": median, "after_vs_before": median["after"] / median["before"],
        "identical_replies": f"{replies}/{len(problems)}", "identical_routing": f"{routes}/{len(problems)}",
    }
    print(f"median s: before {median['before']:.2f}, after {median['after']:.2f}; "
          f"after_vs_before = {result['after_vs_before']:.3f}; identical replies {result['identical_replies']}, "
          f"identical routing {result['identical_routing']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

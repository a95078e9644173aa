"""Training-step cost of the LM head over every position against the supervised positions only.

``model(..., labels=..., supervised_logits_only=True)`` (what training and evaluation use) applies the
frozen LM head, and the cross-entropy, only at the positions whose next token is supervised: on the
default model the head is a 576 x 49,152 matmul per position, and the full ``[B, T, vocab]`` logits of a
batch of 8 x 256 tokens are 400 MB in float32 (and as much again for their gradient). This script builds
the default mixture (4 experts x r=16, token routing) on the default model, and times forward + backward +
AdamW step of both sides interleaved in one process (median of rounds, so machine noise hits both alike),
on a batch whose first ``1 - supervised`` of every row is a -100 prompt (the study's data supervise 47%
of their tokens). It prints ``supervised_vs_full`` (median step time; lower is better), the median of the
within-round ratios as a check, each side's peak step memory above the base (resident set on CPU, the
allocator's peak on CUDA; measured afterwards in one child process per side, never in the timed process) and
the largest difference of the two losses and gradients.

Run::

    python benchmarks/supervised_head.py [--batch 8 --seq 256 --supervised 0.47 --repeats 5]
    python benchmarks/supervised_head.py --device cuda --batch 16
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
from _step_bench import (
    add_memory_arguments,
    interleaved_times,
    make_batch,
    memory_in_children,
    peak_step_memory,
    step_fn,
    write_child_memory,
)

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM, load_base_model

SIDES = ("full", "supervised")


def mixture(base, **config):
    """The default mixture (4 experts, all mature) on a private copy of ``base``."""
    return DyLoRAMoEForCausalLM(copy.deepcopy(base), DyLoRAMoEConfig(num_experts=4, **config), mature=True)


def side_step(model, batch, only: bool):
    """One training step of ``model`` with the head over the supervised positions only (``only``) or all."""
    return step_fn(model, batch, supervised_logits_only=only)


def agreement(base, batch) -> dict[str, float]:
    """The two sides' loss and gradients on one model (no optimizer step): largest absolute differences."""
    model = mixture(base, dropout=0.0)
    with torch.no_grad():
        for b in model.expert_parameters():
            b.normal_(0.0, 0.01)  # non-zero B: the experts change the output, every parameter gets a gradient
    found = []
    for only in (False, True):
        model.zero_grad(set_to_none=True)
        out = model(**batch, supervised_logits_only=only)
        out.loss.backward()
        found.append((out.lm_loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss_a, grads_a), (loss_b, grads_b) = found
    return {"loss_diff": float((loss_a - loss_b).abs()), "loss": float(loss_a),
            "grad_max_diff": max(float((a - b).abs().max()) for a, b in zip(grads_a, grads_b)),
            "grad_max": max(float(a.abs().max()) for a in grads_a)}


def peak_memory(base, batch, only: bool, device: str) -> int:
    """Peak bytes of two training steps (the second has optimizer state) above the base model."""
    return peak_step_memory(lambda: side_step(mixture(base), batch, only), base, device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--supervised", type=float, default=0.47, help="share of each row's tokens supervised")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the result here")
    add_memory_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    base = load_base_model(args.model)[0].to(args.device)
    batch = make_batch(base.config.vocab_size, args.device, args.batch, args.seq, args.supervised)
    if args.memory_of:  # child mode: the peak step memory of one side
        return write_child_memory(args.memory_json, peak_memory(base, batch, args.memory_of == "supervised",
                                                                args.device))
    print(f"== {args.model}: batch {args.batch} x {args.seq} tokens, {args.supervised:.0%} supervised, "
          f"{args.device}, {torch.get_num_threads()} threads", flush=True)
    check = agreement(base, batch)
    print(f"  loss {check['loss']:.6f}: |full - supervised| {check['loss_diff']:.2e}; gradients: max |diff| "
          f"{check['grad_max_diff']:.2e} of max |grad| {check['grad_max']:.2e}", flush=True)
    steps = {}
    for side in SIDES:
        torch.manual_seed(0)
        steps[side] = side_step(mixture(base), batch, side == "supervised")
        steps[side]()  # warm-up
    times = interleaved_times(steps, args.repeats, args.device)
    del steps
    med = {side: statistics.median(t) for side, t in times.items()}
    memory = {side: 0 for side in SIDES} if args.no_memory else memory_in_children(
        __file__, [a for a in argv if a != "--no-memory"], SIDES)
    result = {
        "model": args.model, "device": args.device, "batch": args.batch, "seq_len": args.seq,
        "supervised": args.supervised, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "median_step_s": {s: round(t, 4) for s, t in med.items()},
        "supervised_vs_full": round(med["supervised"] / med["full"], 4),
        "paired": round(statistics.median(b / a for a, b in zip(times["full"], times["supervised"])), 4),
        "peak_step_bytes": memory,
        "mem_supervised_vs_full": round(memory["supervised"] / memory["full"], 4) if memory["full"] else None,
        **check,
    }
    print(f"  supervised_vs_full {result['supervised_vs_full']} (paired {result['paired']}); peak step memory "
          f"{memory['full'] / 2**20:.0f} -> {memory['supervised'] / 2**20:.0f} MiB "
          f"({result['mem_supervised_vs_full']})")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

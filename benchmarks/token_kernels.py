"""Token-routing inference kernels: per-expert matmuls (today) against the stacked training kernel.

Without autograd, sparse token routing runs each expert with its own matrices, so a token's result does
not depend on the other experts in the pool and adding experts (continual learning) leaves the old ones
bit for bit unchanged. Two such kernels exist (``dylora_moe.experts``):

* ``grouped`` (``_grouped_per_token``): tokens sorted by expert, two matmuls per chosen expert over its
  own tokens; one device sync per layer (the group sizes);
* ``unrolled`` (``_per_expert_all_tokens``): every expert over all tokens with the sparse gates.

``GROUPED_TOKEN_MIN_TOKENS`` picks ``grouped`` from that many tokens on. The training kernel for small
pools, ``stacked`` (``_dense`` with sparse gates: all experts in one rank-E*R matmul pair), was the
inference path before and does not keep old experts bit-exact. This script times the three on one
adapted projection of the default model (d=576, 4 experts x r=16, top-1, random routing), interleaved
in the same process, for decode steps (one token per row) and whole sequences (prefill, evaluation,
analysis). It prints each kernel's median time, ``chosen_vs_stacked`` (the kernel the dispatch picks
for that shape, against the old path; lower is better) and whether all three agree to float rounding.

On the CPU, training uses a third kernel, ``segmented`` (``dylora_moe.segmented``: tokens sorted by expert once
per decision, each expert over its own segment, a hand-written backward); its forward without autograd is timed
beside the others (inference does not use it: it loses to ``grouped`` at prefill). ``--training`` times
forward + backward (with the gradients of the input, the gates
and every expert) of ``segmented`` against ``stacked`` on a training batch (4 x 256 tokens), for pools of 4
and 8 experts and the default model's two projection widths (576 -> 576 and 576 -> 192), and prints
``segmented_vs_stacked`` (lower is better).

Run::

    python benchmarks/token_kernels.py [--repeats 7] [--threads 2]
    python benchmarks/token_kernels.py --training [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dylora_moe.experts import (
    GROUPED_TOKEN_MIN_TOKENS,
    _dense,
    _grouped_per_token,
    _per_expert_all_tokens,
    stack_experts,
)
from dylora_moe.routing import decide
from dylora_moe.segmented import build_segments, segmented_lora

SHAPES = [(32, 1), (256, 1), (8, 256), (32, 256)]  # (rows, tokens per row)


def _timed(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _kernels(x, dec, scale, a_list, b_list) -> dict:
    """The three kernels on one input ``x [rows, tokens, d]`` and its decision, as zero-argument calls."""
    flat, gates, weights = x.reshape(-1, x.shape[-1]), dec.gates * scale[dec.indices], dec.dense_weights() * scale
    return {
        "grouped": lambda: _grouped_per_token(flat, dec.indices.reshape(-1, 1), gates.reshape(-1, 1), a_list, b_list),
        "unrolled": lambda: _per_expert_all_tokens(flat, weights.reshape(flat.shape[0], -1), a_list, b_list),
        "stacked": lambda: _dense(x, weights, *stack_experts(a_list, b_list)),
        "segmented": lambda: _segmented(flat, dec.indices.reshape(-1, 1), gates.reshape(-1), a_list, b_list),
    }


def _segmented(flat, indices, gates, a_list, b_list):
    seg = build_segments(indices, len(a_list))
    return segmented_lora(flat, seg.sort(gates), seg, a_list, b_list)


def _training_step(kind, x, logits, scale, a_list, b_list):
    """Forward + backward of one training kernel, as a zero-argument call."""

    def step() -> None:
        dec = decide(logits, torch.ones(logits.shape[:-1], dtype=torch.bool), mode="sparse", top_k=1,
                     temperature=1.0)
        if kind == "stacked":
            y = _dense(x, dec.dense_weights() * scale, *stack_experts(a_list, b_list))
        else:
            y = _segmented(x.reshape(-1, x.shape[-1]), dec.indices.reshape(-1, 1),
                           (dec.gates * scale[dec.indices]).reshape(-1), a_list, b_list)
        y.square().mean().backward()

    return step


def training(args) -> dict:
    """Forward + backward of ``segmented`` against ``stacked`` on a training batch, per pool size and width."""
    gen = torch.Generator().manual_seed(0)
    results = {}
    for experts in (4, 8):
        for d_out in (args.dim, args.dim // 3):
            a_list = [(torch.randn(args.rank, args.dim, generator=gen) * 0.02).requires_grad_() for _ in range(experts)]
            b_list = [(torch.randn(d_out, args.rank, generator=gen) * 0.02).requires_grad_() for _ in range(experts)]
            x = torch.randn(4, 256, args.dim, generator=gen, requires_grad=True)
            logits = torch.randn(4, 256, experts, generator=gen, requires_grad=True)
            scale = torch.full((experts,), 2.0)

            times: dict[str, list[float]] = {"stacked": [], "segmented": []}
            for _ in range(args.repeats):
                for kind in times:
                    call = _training_step(kind, x, logits, scale, a_list, b_list)
                    call()
                    times[kind].append(_timed(call, args.calls))
            med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
            key = f"E={experts} {args.dim}->{d_out}"
            results[key] = {**{f"{k}_us": v for k, v in med.items()},
                            "segmented_vs_stacked": med["segmented"] / med["stacked"]}
            print(f"{key:>14}: stacked {med['stacked']:6.0f} us  segmented {med['segmented']:6.0f} us  "
                  f"segmented_vs_stacked {med['segmented'] / med['stacked']:.2f}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds per shape (median)")
    parser.add_argument("--calls", type=int, default=20, help="kernel calls per round")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dim", type=int, default=576, help="d_in = d_out of the projection")
    parser.add_argument("--training", action="store_true", help="time forward + backward of the training kernels")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.training:
        print(json.dumps(training(args)))
        return
    gen = torch.Generator().manual_seed(0)
    e, r, d = args.experts, args.rank, args.dim
    a_list = [torch.randn(r, d, generator=gen) * 0.02 for _ in range(e)]
    b_list = [torch.randn(d, r, generator=gen) * 0.02 for _ in range(e)]
    scale = torch.full((e,), 2.0)
    results = {}
    with torch.no_grad():
        for rows, tokens in SHAPES:
            x = torch.randn(rows, tokens, d, generator=gen)
            logits = torch.randn(rows, tokens, e, generator=gen)
            dec = decide(logits, torch.ones(rows, tokens, dtype=torch.bool), mode="sparse", top_k=1, temperature=2.0)

            kernels = _kernels(x, dec, scale, a_list, b_list)
            outs = [fn().reshape(rows, tokens, d) for fn in kernels.values()]
            agree = all(torch.allclose(o, outs[-1], atol=1e-6) for o in outs)
            times = {name: [] for name in kernels}
            for _ in range(args.repeats):
                for name, fn in kernels.items():
                    fn()
                    times[name].append(_timed(fn, args.calls))
            med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
            chosen = "grouped" if rows * tokens >= GROUPED_TOKEN_MIN_TOKENS else "unrolled"
            ratio = med[chosen] / med["stacked"]
            key = f"{rows}x{tokens}"
            results[key] = {**{f"{k}_us": v for k, v in med.items()}, "chosen": chosen,
                            "chosen_vs_stacked": ratio, "agree": agree}
            print(f"{key:>8} tokens: " + "  ".join(f"{k} {v:7.0f} us" for k, v in med.items())
                  + f"  chosen {chosen}: chosen_vs_stacked {ratio:.2f}  agree {agree}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

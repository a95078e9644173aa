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

Run::

    python benchmarks/token_kernels.py [--repeats 7] [--threads 2]
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds per shape (median)")
    parser.add_argument("--calls", type=int, default=20, help="kernel calls per round")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dim", type=int, default=576, help="d_in = d_out of the projection")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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

"""How well each similarity of the novelty detector tells known skills from new ones, on real domains.

Every domain is a skill: its embedding comes from ``--examples`` examples of its train split, drawn at random
(``--seed``; files are often ordered, e.g. Spider by database). Each domain's held-out split (validation,
``--examples`` drawn the same way) is then asked twice:

* against the library of all domains: it is *known* (it must not be flagged);
* against the library of the other domains (leave one out): it is *new* (it must be flagged).

For each similarity (``raw``: the seed's cosine of mean states; ``standardized``: see
``dylora_moe.continual.novelty``) the script prints the lowest similarity of a known query to its own skill,
the highest similarity of a new query to any skill, whether a threshold separates them, and the precision
and recall of novelty at the given thresholds. Queries are asked with the first ``--query-sizes`` examples
of their draw too (the detector sees batches of a few examples in ``dylora-moe continual``), with the
sample-size correction of the standardized similarity. Run::

    python benchmarks/novelty_calibration.py --model smollm2-135m --examples 64 --query-sizes 8 16 64 \
        --json novelty.json
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.continual.library import SkillLibrary, pooled_states
from dylora_moe.continual.novelty import SIMILARITIES, similarities
from dylora_moe.data import load_examples
from dylora_moe.loading import load_base_model

DOMAINS = ["mbpp", "code_alpaca", "spider", "js_snippets", "shell_cheats", "asdiv"]


def library_of(states: dict[str, torch.Tensor], names: list[str]) -> SkillLibrary:
    library = SkillLibrary()
    for i, name in enumerate(names):
        library.add(name, states[name].mean(0), i, len(states[name]), spread=states[name].std(0))
    return library


def scores(states, queries, kind: str, size: int) -> tuple[list[float], list[float]]:
    """(own similarity of every known query, best similarity of every new query), each query cut to its first
    ``size`` examples."""
    names = list(states)
    full = library_of(states, names)
    known, new = [], []
    for name, q in queries.items():
        q = q[:size]
        spread = q.std(0) if len(q) > 1 else None
        sims = similarities(q.mean(0), full, kind=kind, spread=spread, count=len(q))
        known.append(sims[names.index(name)])
        others = [n for n in names if n != name]
        new.append(max(similarities(q.mean(0), library_of(states, others), kind=kind, spread=spread,
                                    count=len(q))))
    return known, new


def precision_recall(known: list[float], new: list[float], threshold: float) -> tuple[float, float]:
    flagged_new = sum(s < threshold for s in new)
    flagged_known = sum(s < threshold for s in known)
    precision = flagged_new / max(flagged_new + flagged_known, 1)
    return precision, flagged_new / max(len(new), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--domains", nargs="+", default=DOMAINS)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.75, 0.85, 0.9, 0.95, 0.5])
    parser.add_argument("--query-sizes", type=int, nargs="+", default=None,
                        help="examples per query (default: --examples)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    base, tokenizer = load_base_model(args.model)
    model = DyLoRAMoEForCausalLM(base, DyLoRAMoEConfig(num_experts=1, r=1, alpha=1))
    states, queries = {}, {}
    for name in args.domains:
        for split, out in (("train", states), ("validation", queries)):
            examples = load_examples(name, args.data_dir, split=split)
            examples = random.Random(args.seed).sample(examples, min(args.examples, len(examples)))
            out[name] = pooled_states(model, tokenizer, examples, max_seq_length=args.max_seq_length)
        print(f"{name}: {len(states[name])} train, {len(queries[name])} held-out examples embedded", flush=True)
    report = {"model": args.model, "examples": args.examples, "seed": args.seed, "domains": args.domains,
              "similarities": {}}
    for size in args.query_sizes or [args.examples]:
        for kind in SIMILARITIES:
            known, new = scores(states, queries, kind, size)
            row = {"query_examples": size, "known_min": min(known), "new_max": max(new),
                   "separable": min(known) > max(new), "known": dict(zip(args.domains, known)),
                   "new": dict(zip(args.domains, new)),
                   "at": {str(t): precision_recall(known, new, t) for t in args.thresholds}}
            report["similarities"][f"{kind}@{size}"] = row
            print(f"{kind:>12} @ {size:>3} examples: known min {row['known_min']:.4f}  new max {row['new_max']:.4f}  "
                  f"separable {row['separable']}  " + "  ".join(
                      f"t={t}: P {p:.2f} R {r:.2f}" for t, (p, r) in row["at"].items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

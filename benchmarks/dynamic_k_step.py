"""Training-step cost of dynamic top-k against fixed k, with the routers the study trained, side by side in one process.

A fresh router's k says little about a trained one's (a learned threshold moves, a router grows confident), so this
loads the final adapters of the units of ``configs/study-dynamic-k.yaml`` on one shared base model and times a
training step of each (forward + backward + fused AdamW, as ``dylora-moe train`` runs it) on the same batch of
held-out examples of the six domains (one batch, ``--per-domain`` examples of each, cut at ``--seq`` tokens), the
median of interleaved rounds (machine noise hits every variant alike); then the same for a forward without
gradients (evaluation, or the prefill of generation: the grouped decoding kernel). Prints each variant's mean k on
the batch (experts per routing decision) and its times against ``--baseline`` (fixed k=1)::

    dylora-moe study --config configs/study-dynamic-k.yaml        # the units first
    python benchmarks/dynamic_k_step.py --study runs/study-dynamic-k --repeats 5 --json dynamic-k-step.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

from dylora_moe import DyLoRAMoEForCausalLM
from dylora_moe.data import DataCollator, tokenize_examples
from dylora_moe.evaluation.analysis import load_domain_data
from dylora_moe.loading import load_base_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _step_bench import interleaved_times, ratio, step_fn, trim  # noqa: E402

VARIANTS = "k1,k2,top_p,learned,learned_cost,learned_fast,learned_fast_cost"
DOMAINS = "mbpp,code_alpaca,spider,js_snippets,shell_cheats,asdiv"


def inference_fn(model, batch):
    """A forward of ``model`` on ``batch`` without gradients, in eval mode (as evaluation and prefill run it)."""
    def forward() -> None:
        model.eval()
        with torch.inference_mode():
            model(**batch)
        model.train()

    return forward


def held_out_batch(tokenizer, domains: list[str], per_domain: int, seq: int, data_dir: str | None) -> dict:
    """``per_domain`` validation examples of every domain, tokenized (at most ``seq`` tokens) and collated."""
    by_domain = load_domain_data(domains, "validation", per_domain, data_dir)
    examples = [ex for exs in by_domain.values() for ex in exs]
    tokenized, _ = tokenize_examples(examples, tokenizer, seq)
    batch = DataCollator.from_tokenizer(tokenizer)(tokenized)
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="runs/study-dynamic-k", help="the study's output_dir")
    parser.add_argument("--variants", default=VARIANTS)
    parser.add_argument("--baseline", default="k1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="smollm2-135m", help="the base model the units trained")
    parser.add_argument("--domains", default=DOMAINS)
    parser.add_argument("--per-domain", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--data-dir")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    dirs = {n: Path(args.study) / n / f"seed{args.seed}" / "train" / "final" for n in names}
    missing = [str(d) for d in dirs.values() if not d.is_dir()]
    if missing:
        parser.error(f"no trained adapter at {', '.join(missing)}: run the study's units first")
    base, tokenizer = load_base_model(args.model)
    batch = held_out_batch(tokenizer, args.domains.split(","), args.per_domain, args.seq, args.data_dir)
    steps, forwards, mean_k = {}, {}, {}
    for name, folder in dirs.items():
        model = DyLoRAMoEForCausalLM.from_pretrained(folder, copy.deepcopy(base))
        model.train()
        with torch.no_grad():
            mean_k[name] = float(model(**batch).active_experts)
        steps[name] = step_fn(model, batch)
        forwards[name] = inference_fn(model, batch)
    del base
    trim()
    print(f"batch {tuple(batch['input_ids'].shape)}, {int(batch['attention_mask'].sum())} tokens")
    times = {"train": interleaved_times(steps, args.repeats, "cpu", "train step, "),
             "forward": interleaved_times(forwards, args.repeats, "cpu", "forward, ")}
    rows: dict[str, dict] = {}
    for name in names:
        rows[name] = {"mean_k": mean_k[name]}
        for kind, measured in times.items():
            r = ratio(measured, name, args.baseline)
            rows[name][kind] = {"median_s": statistics.median(measured[name]), "vs_baseline": r[0] if r else None,
                                "vs_baseline_paired": r[1] if r else None}
        print(f"{name:18s} mean k {mean_k[name]:.3f}  " + "  ".join(
            f"{kind} {row['median_s']:.3f} s x{row['vs_baseline']} (paired {row['vs_baseline_paired']})"
            for kind, row in rows[name].items() if kind != "mean_k") + f"  vs {args.baseline}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "times": times, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

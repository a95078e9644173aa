"""Training-step cost of each design of the six-domain study against one LoRA r=64, side by side in one process.

The variants are those of ``configs/study-domains.yaml`` (token routing, top-1, 4 x r=16 unless named):
``lora_r64`` (one expert of rank 64, the baseline: the parameters of 4 x r=16), ``moe4``, ``hydra4_r29``
(one shared A r=29, 4 B heads), ``top2``, ``soft`` (every expert mixed), ``goat`` (SVD-segment experts,
GOAT's scale, top-2), ``goat_seq`` (the same with sequence routing), ``goat_mi`` (the same with the domain routing
loss; the batch's sequences get domains 0, 1, 0, 1 and every design is handed them), ``goat_mir`` (the loss on
running statistics, with the trainer's work on them each step: ``training/domain_stats.py``), ``goat_ctx`` (the
loss at 2 with token routers that also see the prompt's mean embedding, ``router_context``), ``ortho_z`` (similarity
loss and router z-loss), ``mola`` (2 to 6 experts per block); and on attention + MLP ``moe4_mlp`` against
``lora_r64_mlp``.
Forward + backward + AdamW, the median of interleaved rounds (machine noise hits every variant alike), batch
4 x 256 tokens with a quarter prompt, in a plain process, and the peak memory of a step above the shared base
(measured afterwards, one child process per design: ``_step_bench.memory_in_children``). Prints each
variant's ratio to its LoRA r=64; the issue's bar is a step time within 1.15x::

    python benchmarks/designs_step.py --model smollm2-135m --repeats 5 --json designs.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.training.domain_stats import RunningDomainRouting

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _step_bench import (  # noqa: E402
    interleaved_times,
    load,
    make_batch,
    memory_in_children,
    parse_step_arguments,
    peak_step_memory,
    step_fn,
    trim,
    write_child_memory,
)

ATTENTION = dict(routing="token")
DESIGNS: dict[str, dict] = {
    "lora_r64": dict(num_experts=1, r=64, alpha=128),
    "moe4": {},
    "hydra4_r29": dict(shared_a=True, num_experts=4, r=29, alpha=58),
    "top2": dict(top_k=2),
    "soft": dict(routing_mode="dense"),
    "goat": dict(expert_init="svd", scaling="goat", top_k=2),
    "goat_seq": dict(expert_init="svd", scaling="goat", top_k=2, routing="sequence"),
    "goat_mi": dict(expert_init="svd", scaling="goat", top_k=2, domain_mi_coef=10.0),
    "goat_mir": dict(expert_init="svd", scaling="goat", top_k=2, domain_mi_coef=2.0, domain_mi_decay=0.9),
    "goat_ctx": dict(expert_init="svd", scaling="goat", top_k=2, domain_mi_coef=2.0, router_context="prompt"),
    "ortho_z": dict(ortho_coef=0.1, z_loss_coef=0.001),
    "mola": dict(num_experts=6, layer_experts="increasing"),
    "lora_r64_mlp": dict(num_experts=1, r=64, alpha=128, target_modules="all-linear"),
    "moe4_mlp": dict(target_modules="all-linear"),
}
BASELINE = {name: ("lora_r64_mlp" if name.endswith("_mlp") else "lora_r64") for name in DESIGNS}
BAR = 1.15


def domains_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Two domains taking turns over the batch's sequences ``[B]`` (only the domain routing loss reads them)."""
    ids = batch["input_ids"]
    return torch.arange(ids.shape[0], device=ids.device) % 2


def build(name: str, base) -> DyLoRAMoEForCausalLM:
    config = DyLoRAMoEConfig(**{**ATTENTION, **DESIGNS[name]})
    return DyLoRAMoEForCausalLM(copy.deepcopy(base), config, mature=True)


def design_step(name: str, base, batch: dict[str, torch.Tensor]):
    """One training step of design ``name``; with running domain statistics, the trainer's work on them too."""
    model, domains = build(name, base), domains_of(batch)
    if not model.moe_config.domain_mi_decay:
        return step_fn(model, batch, domain_ids=domains)
    stats = RunningDomainRouting(2, model.moe_config.domain_mi_decay, len(model.router_slots), model.num_experts)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    model.train()

    def step() -> None:
        out = model(**batch, domain_ids=domains, domain_pmi=stats.pmi(domains.device))
        out.loss.backward()
        stats.add(out.domain_mass, domains)
        stats.end_step()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run(args) -> dict:
    base = load(args.model, args.dtype, args.device)
    batch = make_batch(base.config.vocab_size, args.device, args.batch, args.seq)
    names = [n for n in DESIGNS if n in args.variants]
    steps = {}
    for name in names:
        steps[name] = design_step(name, base, batch)
        steps[name]()  # warm-up
    times = interleaved_times(steps, args.repeats, args.device, f"[{args.model}] ")
    del steps
    trim()
    memory = {} if args.no_memory else memory_in_children(__file__, args.argv, names)
    median = {n: statistics.median(t) for n, t in times.items()}
    ratios, paired, mem_ratios = {}, {}, {}
    for name in names:
        ref = BASELINE[name]
        if name == ref or ref not in median:
            continue
        ratios[name] = round(median[name] / median[ref], 4)
        paired[name] = round(statistics.median(x / y for x, y in zip(times[name], times[ref])), 4)
        mem_ratios[name] = round(memory[name] / memory[ref], 4) if memory.get(ref) else None
    return {"model": args.model, "device": args.device, "dtype": str(args.dtype).replace("torch.", ""),
            "batch": args.batch, "seq_len": args.seq, "repeats": args.repeats, "threads": torch.get_num_threads(),
            "median_step_s": {n: round(t, 4) for n, t in median.items()}, "step_vs_lora_r64": ratios,
            "paired": paired, "peak_step_bytes": memory, "memory_vs_lora_r64": mem_ratios,
            "within_bar": {n: r <= BAR for n, r in ratios.items()},
            "step_times_s": {n: [round(x, 4) for x in t] for n, t in times.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="'smollm2-135m', 'tiny-llama' or a hub id/folder")
    args = parse_step_arguments(parser, argv, DESIGNS, "write the result here")
    if args.memory_of:  # child mode: the peak step memory of one design
        base = load(args.model, args.dtype, args.device)
        batch = make_batch(base.config.vocab_size, args.device, args.batch, args.seq)
        peak = peak_step_memory(lambda: design_step(args.memory_of, base, batch), base, args.device)
        return write_child_memory(args.memory_json, peak)
    with tempfile.TemporaryDirectory():
        result = run(args)
    for name, ratio in result["step_vs_lora_r64"].items():
        mem = result["memory_vs_lora_r64"][name]
        print(f"  {name:12s} step {ratio:.3f}x {BASELINE[name]} (paired {result['paired'][name]:.3f}; "
              f"bar <= {BAR}: {'met' if ratio <= BAR else 'NOT met'}), memory {mem}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

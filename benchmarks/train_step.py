"""Training-step cost of DyLoRA-MoE against the floor and one PEFT LoRA, side by side in one plain process.

Times forward + backward + AdamW step as a user's loop runs it (``model(**batch).loss.backward()``), the median
of interleaved rounds (each round runs every variant once, so machine noise hits them alike), in the process a
user trains in: no allocator setting, the default thread count. Variants, on the q/k/v/o projections:

* ``floor``         the frozen base with gradients only to its input embeddings: no adapter, no optimizer
* ``lora``          one PEFT LoRA r=16 (alpha 32, dropout 0.05)
* ``default``       what ``configs/default.yaml`` trains: 4 experts r=16, token routing, top-1, and the LM head on
                    the supervised positions only (the model's default in a training step with labels)
* ``default_full``  the same with the LM head over every position (``supervised_logits_only=False``, as PEFT)
* ``sequence``      4 experts, sequence routing (one expert per sequence), supervised head
* ``moe8``          8 experts, otherwise ``default``
* ``dense``         ``default`` with one expert immature: the dense softmax mixture of all experts
* ``xlora``         PEFT X-LoRA over 4 LoRA adapters (reference only; two base passes per step)

Prints every variant against the floor and against PEFT LoRA (median ratio and the median of within-round
ratios), with the bars of issue #33: ``default`` <= 1.10x the floor, ``sequence`` <= 1.05x the floor,
``moe8`` <= 1.05x ``default``. Peak step memory (``floor``, ``lora``, ``default``, ``sequence``) is measured
afterwards, one child process per variant (``_step_bench.memory_in_children``), never in the timed process.

Run::

    python benchmarks/train_step.py --models smollm2-135m --repeats 5 --json bench.json
    python benchmarks/train_step.py --models tiny-llama --repeats 15 --no-memory
    python benchmarks/train_step.py --device cuda --dtype bfloat16 --models smollm2-135m --batch 8 --seq 512
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from pathlib import Path

import torch
from _step_bench import (
    floor_step,
    interleaved_times,
    load,
    make_batch,
    memory_in_children,
    parse_step_arguments,
    peak_step_memory,
    ratio,
    step_fn,
    trim,
    write_child_memory,
)

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM

VARIANTS = ("floor", "lora", "default", "default_full", "sequence", "moe8", "dense", "xlora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
#: (variant, reference, bar): issue #33's bars on median step time
BARS = (("default", "floor", 1.10), ("sequence", "floor", 1.05), ("moe8", "default", 1.05))
MEMORY_VARIANTS = ("floor", "lora", "default", "sequence")


def build(variant: str, base, workdir: Path):
    """``(model, forward kwargs)`` of ``variant`` on a private copy of ``base``."""
    base = copy.deepcopy(base)
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS)), {}
    if variant == "xlora":
        return build_xlora(base, workdir), {}
    config = DyLoRAMoEConfig(num_experts=8 if variant == "moe8" else 4, target_modules=TARGETS,
                             routing="sequence" if variant == "sequence" else "token")
    model = DyLoRAMoEForCausalLM(base, config, mature=True)
    if variant == "dense":
        model.set_maturity(config.num_experts - 1, False)
    return model, ({"supervised_logits_only": False} if variant == "default_full" else {})


def build_xlora(base, workdir: Path):
    from peft import LoraConfig, XLoraConfig, get_peft_model

    adapters = {}
    for i in range(4):
        path = workdir / f"lora{i}"
        if not path.exists():
            get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)
                           ).save_pretrained(path)
        adapters[str(i)] = str(path)
    cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size, adapters=adapters,
                      xlora_depth=1)
    base.config.use_cache = False
    return get_peft_model(base, cfg)


def make_step(variant: str, base, batch, workdir: Path):
    if variant == "floor":
        return floor_step(copy.deepcopy(base), batch)
    model, kwargs = build(variant, base, workdir)
    return step_fn(model, batch, **kwargs)


def run_setting(name: str, args, workdir: Path) -> dict:
    base = load(name, args.dtype, args.device)
    batch = make_batch(base.config.vocab_size, args.device, args.batch, args.seq)
    steps, errors = {}, {}
    for v in (v for v in VARIANTS if v in args.variants):
        try:
            steps[v] = make_step(v, base, batch, workdir)
            steps[v]()  # warm-up
        except Exception as exc:  # X-LoRA is optional: report why it did not run
            errors[v] = f"{type(exc).__name__}: {exc}"[:300]
            steps.pop(v, None)
    times = interleaved_times(steps, args.repeats, args.device, f"[{name}] ")
    del steps
    trim()
    memory = {} if args.no_memory else memory_in_children(
        __file__, [*args.argv, "--models", name], [v for v in MEMORY_VARIANTS if v in times])
    against = {ref: {v: ratio(times, v, ref) for v in times if v != ref} for ref in ("floor", "lora")}
    bars = {f"{v}_vs_{ref}": {"bar": bar, "ratio": ratio(times, v, ref)} for v, ref, bar in BARS}
    for entry in bars.values():
        entry["met"] = entry["ratio"] is not None and entry["ratio"][0] <= entry["bar"]
    return {
        "model": name, "device": args.device, "dtype": str(args.dtype).replace("torch.", ""),
        "batch": args.batch, "seq_len": args.seq, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "median_step_s": {v: round(statistics.median(t), 4) for v, t in times.items()},
        "vs_floor": against["floor"], "vs_lora": against["lora"], "bars": bars,
        "peak_step_bytes": memory,
        "memory_vs_lora": {v: round(m / memory["lora"], 4) for v, m in memory.items() if memory.get("lora")},
        "step_times_s": {v: [round(x, 4) for x in t] for v, t in times.items()},
        "errors": errors,
    }


def report(res: dict) -> None:
    print(f"  {'variant':13s} {'s/step':>7s}  {'vs floor (paired)':>18s}  {'vs PEFT LoRA (paired)':>22s}  memory")
    for v, sec in res["median_step_s"].items():
        cells = []
        for ref in ("floor", "lora"):
            r = res[f"vs_{ref}"].get(v)
            cells.append("1.000" if v == ref else (f"{r[0]:.3f} ({r[1]:.3f})" if r else "-"))
        mem = res["peak_step_bytes"].get(v)
        print(f"  {v:13s} {sec:7.3f}  {cells[0]:>18s}  {cells[1]:>22s}  "
              + (f"{mem / 2**20:.0f} MiB" if mem is not None else "-"))
    for key, entry in res["bars"].items():
        r = entry["ratio"]
        print(f"  bar {key} <= {entry['bar']}: " + (f"{r[0]:.3f} (paired {r[1]:.3f}) "
                                                     f"{'met' if entry['met'] else 'NOT met'}" if r else "not run"))
    if res["errors"]:
        print(f"  not run: {res['errors']}")


def child_memory(args) -> int:
    """Child mode (``--memory-of``): the peak step memory of one variant, written to ``--memory-json``."""
    base = load(args.models.split(",")[0], args.dtype, args.device)
    batch = make_batch(base.config.vocab_size, args.device, args.batch, args.seq)
    with tempfile.TemporaryDirectory() as tmp:
        peak = peak_step_memory(lambda: make_step(args.memory_of, base, batch, Path(tmp)), base, args.device)
    return write_child_memory(args.memory_json, peak)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m", help="comma-separated: smollm2-135m, tiny-llama, ...")
    args = parse_step_arguments(parser, argv, VARIANTS, "write one JSON object per model setting (a list) here")
    if args.memory_of:
        return child_memory(args)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            print(f"== {name}: batch {args.batch} x {args.seq} tokens, {args.device}/{args.dtype}, "
                  f"{torch.get_num_threads()} threads, plain process", flush=True)
            workdir = Path(tmp) / name  # X-LoRA's adapters are saved per base model
            workdir.mkdir()
            res = run_setting(name, args, workdir)
            results.append(res)
            report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training-step cost of DyLoRA-MoE against one PEFT LoRA, side by side in one process.

Times forward + backward + AdamW step (median of interleaved repeats, so machine noise hits every
variant alike) for, on each model setting:

* ``lora``        one PEFT LoRA r=16 on the same target modules (the baseline)
* ``moe4``        4 experts r=16, all mature: sparse top-1, sequence routing (the default)
* ``moe8``        8 experts r=16, sparse top-1, sequence routing
* ``moe4_dense``  4 experts, one immature: dense softmax mixture of all experts
* ``moe4_token``  4 experts, sparse top-1, token routing
* ``xlora``       PEFT X-LoRA over 4 LoRA adapters (reference only)

and prints these ratios of median step time (and, as a check, the median of the ratios within
each round): ``moe4_vs_lora`` (bar <= 1.10), ``moe8_vs_moe4``
(<= 1.05), ``dense_vs_sparse`` (<= 1.10), ``token_vs_sequence``, ``xlora_vs_lora``; and of peak
memory of a training step, ``mem_moe4_vs_lora`` (<= 1.10). Peak memory is the device allocator's
peak on CUDA and the process's peak resident set (VmHWM, reset per variant) above the shared base
on CPU.

Run::

    python benchmarks/train_step.py --models tiny-llama,smollm2-135m --repeats 5 --json out.json
    python benchmarks/train_step.py --device cuda --dtype bfloat16 --models smollm2-135m
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM, load_base_model
from dylora_moe.common.memory import rss_bytes

VARIANTS = ("lora", "moe4", "moe8", "moe4_dense", "moe4_token", "xlora")
BARS = {"moe4_vs_lora": 1.10, "moe8_vs_moe4": 1.05, "dense_vs_sparse": 1.10, "mem_moe4_vs_lora": 1.10}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=8192, max_position_embeddings=512)
    return LlamaForCausalLM(cfg)


def load(name: str, dtype: torch.dtype, device: str):
    model = tiny_llama() if name == "tiny-llama" else load_base_model(name)[0]
    return model.to(device=device, dtype=dtype)


def build(variant: str, base, workdir: Path):
    """Return the trainable model for ``variant`` on a private copy of ``base``."""
    base = copy.deepcopy(base)
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    if variant == "xlora":
        return build_xlora(base, workdir)
    n = 8 if variant == "moe8" else 4
    routing = "token" if variant == "moe4_token" else "sequence"
    model = DyLoRAMoEForCausalLM(base, DyLoRAMoEConfig(num_experts=n, routing=routing, target_modules=TARGETS),
                                 mature=True)
    if variant == "moe4_dense":
        model.set_maturity(n - 1, False)
    return model


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


def make_batch(vocab: int, device: str, batch: int, seq: int):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    labels = ids.clone()
    labels[:, : seq // 4] = -100  # a prompt quarter, as in instruction data
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": labels.to(device)}


def step_fn(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step():
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def interleaved_times(steps: dict, repeats: int, device: str, label: str = "") -> dict[str, list[float]]:
    """Seconds of each call of every step, ``repeats`` rounds, each round calling every step once in turn (so
    machine noise hits them alike); prints each round."""
    times = {name: [] for name in steps}
    for r in range(repeats):
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        print(f"  {label}round {r + 1}/{repeats}: " + ", ".join(f"{n}={t[-1]:.3f}s" for n, t in times.items()),
              flush=True)
    return times


def peak_step_memory(make_step, base, device: str) -> int:
    """Peak bytes of two calls of the step ``make_step()`` builds (optimizer state exists in the second), above
    the base model (the deep copy each variant makes of it is subtracted)."""
    trim()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = rss_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    step = make_step()
    for _ in range(2):
        step()
    sync(device)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else rss_bytes("VmHWM")
    del step
    trim()
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    return max(peak - before - base_bytes, 0)


def peak_memory(variant, base, batch, device, workdir) -> int:
    """Peak bytes of a training step of ``variant`` above the base."""
    return peak_step_memory(lambda: step_fn(build(variant, base, workdir), batch), base, device)


def run_with_mmap_threshold(main) -> None:
    """``sys.exit(main())``, first re-executing the script with ``MALLOC_MMAP_THRESHOLD_`` set on Linux: large
    buffers then go straight to mmap, so freed memory leaves the RSS and VmHWM stays meaningful."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    sys.exit(main())


def run_setting(name, args, workdir):
    base = load(name, args.dtype, args.device)
    global TARGETS
    TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
    batch = make_batch(base.config.vocab_size, args.device, args.batch, args.seq)
    variants = [v for v in VARIANTS if v in args.variants]
    steps, errors = {}, {}
    for v in variants:
        try:
            steps[v] = step_fn(build(v, base, workdir), batch)
            steps[v]()  # warm-up
        except Exception as exc:  # X-LoRA is optional: report why it did not run
            errors[v] = f"{type(exc).__name__}: {exc}"[:300]
            steps.pop(v, None)
    times = interleaved_times(steps, args.repeats, args.device, f"[{name}] ")
    med = {v: statistics.median(t) for v, t in times.items()}
    del steps
    trim()
    mem = {v: peak_memory(v, base, batch, args.device, workdir) for v in ("lora", "moe4")}

    def ratio(a, b):
        return round(med[a] / med[b], 4) if a in med and b in med else None

    def paired(a, b):
        """Median over rounds of the within-round ratio (robust to slow drifts in machine load)."""
        if a not in times or b not in times:
            return None
        return round(statistics.median(x / y for x, y in zip(times[a], times[b])), 4)

    result = {
        "model": name, "device": args.device, "dtype": str(args.dtype).replace("torch.", ""),
        "batch": args.batch, "seq_len": args.seq, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "median_step_s": {v: round(t, 4) for v, t in med.items()},
        "peak_step_bytes": mem,
        "moe4_vs_lora": ratio("moe4", "lora"),
        "moe8_vs_moe4": ratio("moe8", "moe4"),
        "dense_vs_sparse": ratio("moe4_dense", "moe4"),
        "token_vs_sequence": ratio("moe4_token", "moe4"),
        "xlora_vs_lora": ratio("xlora", "lora"),
        "mem_moe4_vs_lora": round(mem["moe4"] / mem["lora"], 4) if mem["lora"] else None,
        "paired_ratios": {
            "moe4_vs_lora": paired("moe4", "lora"), "moe8_vs_moe4": paired("moe8", "moe4"),
            "dense_vs_sparse": paired("moe4_dense", "moe4"), "token_vs_sequence": paired("moe4_token", "moe4"),
            "xlora_vs_lora": paired("xlora", "lora"),
        },
        "step_times_s": {v: [round(x, 4) for x in t] for v, t in times.items()},
        "errors": errors,
    }
    result["bars_met"] = {k: (result[k] is not None and result[k] <= bar) for k, bar in BARS.items()}
    return result


def parse_step_arguments(parser: argparse.ArgumentParser, argv, variants, json_help: str) -> argparse.Namespace:
    """The options every step benchmark shares (variants, batch, length, repeats, device, dtype, JSON output),
    added to ``parser`` and parsed from ``argv``; ``args.dtype`` is a torch dtype, ``args.variants`` a list."""
    parser.add_argument("--variants", default=",".join(variants))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", help=json_help)
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    args.variants = args.variants.split(",")
    return args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny-llama,smollm2-135m")
    args = parse_step_arguments(parser, argv, VARIANTS, "write one JSON object per model setting (a list) here")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            print(f"== {name}: batch {args.batch} x {args.seq} tokens, {args.device}/{args.dtype}", flush=True)
            workdir = Path(tmp) / name  # X-LoRA's adapters are saved per base model
            workdir.mkdir()
            res = run_setting(name, args, workdir)
            results.append(res)
            for key in ("moe4_vs_lora", "moe8_vs_moe4", "dense_vs_sparse", "mem_moe4_vs_lora",
                        "token_vs_sequence", "xlora_vs_lora"):
                bar = f" (bar <= {BARS[key]:.2f}: {'met' if res['bars_met'][key] else 'NOT met'})" \
                    if key in BARS else ""
                print(f"  {key:18s} {res[key]}  (paired {res['paired_ratios'].get(key, '-')}){bar}")
            if res["errors"]:
                print(f"  not run: {res['errors']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_with_mmap_threshold(main)

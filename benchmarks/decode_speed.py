"""Greedy decoding speed of the default mixture against the same model with one PEFT LoRA, side by side.

Tokens per second of ``generate`` (greedy, KV cache, every row running to ``--new-tokens``) for:

* ``lora``      the base model with one PEFT LoRA r=16 on q/k/v/o (unmerged, as PEFT serves an adapter)
* ``default``   the default mixture: 4 experts r=16 on q/k/v/o, token routing, top-1, all mature
* ``sequence``  4 experts, sequence routing (one expert per request, chosen at the prompt)

both with random non-zero B (every adapter really changes the output), on the same random prompts of
``--prompt-tokens`` tokens, at each batch size of ``--batches``, the sides interleaved ``--repeats`` times
(median); the ratio ``default / lora`` of tokens per second has issue #33's bar >= 0.85. On CUDA it also
reports each side's peak allocator memory, and ``--cache static`` / ``--compile`` time transformers' static
KV cache and ``torch.compile`` of the forward, in default mode and in ``reduce-overhead`` mode (CUDA graphs:
one replay per decode step, none of the per-module Python or the routers' hooks); each side runs with the same
setting, so each ratio compares like with like (``--cache dynamic,static`` runs both).

Run::

    python benchmarks/decode_speed.py --batches 1,32 --new-tokens 32 --repeats 3 --json decode.json
    python benchmarks/decode_speed.py --device cuda --dtype bfloat16 --batches 1,32,256 \\
        --cache dynamic,static --compile default,reduce-overhead --json decode-gpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from _step_bench import load

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SIDES = ("lora", "default", "sequence")
BAR = 0.85


def randomise_b(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.01)


def build(side: str, base):
    """The model of ``side`` (eval mode) on a private copy of ``base``."""
    base = copy.deepcopy(base)
    if side == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        randomise_b([p for n, p in model.named_parameters() if "lora_B" in n], 0)
    else:
        config = DyLoRAMoEConfig(target_modules=TARGETS, routing="token" if side == "default" else "sequence")
        model = DyLoRAMoEForCausalLM(base, config, mature=True)
        randomise_b([p for layer in model.expert_layers for p in layer.lora_B], 0)
    return model.eval()


def generate_fn(model, prompts: torch.Tensor, new_tokens: int, cache: str, compiled: str | None):
    """A no-argument function that generates for ``prompts``; ``compiled`` is a ``torch.compile`` mode or None."""
    inner = model.base_model if isinstance(model, DyLoRAMoEForCausalLM) else model
    if compiled:
        inner.forward = torch.compile(inner.forward, dynamic=False, mode=compiled)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=0, attention_mask=torch.ones_like(prompts))
    if cache == "static":
        kwargs["cache_implementation"] = "static"

    @torch.no_grad()
    def run() -> torch.Tensor:
        return model.generate(input_ids=prompts, **kwargs)

    return run


def timed(run, device: str) -> tuple[float, torch.Tensor]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def measure(base, args, batch: int, cache: str, compiled: str | None) -> dict:
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, base.config.vocab_size, (batch, args.prompt_tokens), generator=gen).to(args.device)
    sides = {side: generate_fn(build(side, base), prompts, args.new_tokens, cache, compiled) for side in args.sides}
    for run in sides.values():
        run()  # warm-up (and compilation)
    times: dict[str, list[float]] = {side: [] for side in sides}
    peak: dict[str, int] = {}
    for r in range(args.repeats):
        for side, run in sides.items():
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            seconds, out = timed(run, args.device)
            assert out.shape == (batch, args.prompt_tokens + args.new_tokens), out.shape
            times[side].append(seconds)
            if args.device.startswith("cuda"):
                peak[side] = max(peak.get(side, 0), torch.cuda.max_memory_allocated())
        print(f"  batch {batch} {cache}{f' compiled {compiled}' if compiled else ''} round {r + 1}: "
              + ", ".join(f"{s}={t[-1]:.2f}s" for s, t in times.items()), flush=True)
    tokens = batch * args.new_tokens
    tps = {side: round(tokens / statistics.median(t), 2) for side, t in times.items()}
    result = {"batch": batch, "cache": cache, "compiled": compiled, "tokens_per_s": tps,
              "seconds": {s: [round(x, 3) for x in t] for s, t in times.items()}, "peak_bytes": peak}
    if "lora" in tps:
        result["vs_lora"] = {s: round(v / tps["lora"], 4) for s, v in tps.items() if s != "lora"}
        result["paired_vs_lora"] = {s: round(statistics.median(b / a for a, b in zip(times[s], times["lora"])), 4)
                                    for s in tps if s != "lora"}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="'smollm2-135m', 'tiny-llama' or a hub id/folder")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--cache", default="dynamic", help="comma-separated: dynamic, static")
    parser.add_argument("--compile", nargs="?", const="default", default="",
                        help="also time torch.compile'd forwards, in each comma-separated mode given (bare: 'default'; "
                             "'reduce-overhead' replays CUDA graphs)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    args.sides = args.sides.split(",")
    base = load(args.model, getattr(torch, args.dtype), args.device)
    print(f"== {args.model} {args.device}/{args.dtype}, {torch.get_num_threads()} threads, prompts of "
          f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens", flush=True)
    results = []
    for cache in args.cache.split(","):
        for compiled in [None, *(m for m in args.compile.split(",") if m)]:
            for batch in (int(b) for b in args.batches.split(",")):
                res = measure(base, args, batch, cache, compiled)
                results.append(res)
                ratios = res.get("vs_lora", {})
                print(f"  batch {batch:4d} {cache:8s}{f' compiled {compiled}' if compiled else '':25s} tok/s "
                      + ", ".join(f"{s} {v}" for s, v in res["tokens_per_s"].items())
                      + "".join(f"; {s}/lora {r} (paired {res['paired_vs_lora'][s]})"
                                + (f" bar >= {BAR}: {'met' if r >= BAR else 'NOT met'}" if s == "default" else "")
                                for s, r in ratios.items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "device": args.device, "dtype": args.dtype,
                                               "threads": torch.get_num_threads(), "results": results},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

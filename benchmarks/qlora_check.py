"""QLoRA on a GPU: the frozen base in 4-bit (nf4) against bf16, side by side in one process.

For each base setting (``bf16``, ``nf4``; ``int8`` with ``--int8``) the script wraps the base with 4 experts
(r=16, all linear layers), trains ``--steps`` AdamW steps at lr 2e-4 on fixed random token batches under bf16
autocast, and prints the CUDA allocator's peak memory, the median step time, the first and last loss, and the
ratios of the quantized settings against bf16. It checks that the loss falls and that the experts stay float32
while the base is quantized. Needs a CUDA GPU and bitsandbytes; on a machine without them it says so and exits 2.
One short command when a GPU is lent::

    pip install bitsandbytes && python benchmarks/qlora_check.py --model smollm2-135m --steps 20 --json qlora.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.errors import BaseModelError
from dylora_moe.loading import load_base_model, quantization_config


def run(model_name: str, quantization: str, steps: int, batch: int, length: int) -> dict[str, float | str]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    dtype = torch.bfloat16
    base, _ = load_base_model(model_name, dtype=dtype, device="cuda", quantization=quantization)
    model = DyLoRAMoEForCausalLM(base, DyLoRAMoEConfig(num_experts=4, r=16, alpha=32, target_modules="all-linear"),
                                 mature=True).cuda()
    experts = {p.dtype for p in model.expert_parameters()}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=2e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (batch, length), generator=gen).cuda()
    losses, times = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(out.lm_loss))
    return {"quantization": quantization, "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
            "step_s": statistics.median(times[1:] or times), "first_loss": losses[0], "last_loss": losses[-1],
            "loss_falls": losses[-1] < losses[0], "expert_dtypes": sorted(str(d) for d in experts)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--int8", action="store_true", help="also the 8-bit base")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    try:
        quantization_config("nf4", torch.bfloat16)
    except BaseModelError as exc:
        print(f"qlora_check: {exc}", file=sys.stderr)
        return 2
    rows = [run(args.model, q, args.steps, args.batch, args.length)
            for q in ["none", "nf4", *(["int8"] if args.int8 else [])]]
    base = rows[0]
    for row in rows:
        row["mem_vs_bf16"] = row["peak_mib"] / base["peak_mib"]
        row["time_vs_bf16"] = row["step_s"] / base["step_s"]
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0 if all(r["loss_falls"] and r["expert_dtypes"] == ["torch.float32"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

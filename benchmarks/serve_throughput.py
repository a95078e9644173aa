"""Throughput of ``dylora-moe serve`` against plain transformers generation of one merged expert, side by side.

The script saves an adapter of the default mixture on ``--model`` (4 experts, r=16, the routing of
``configs/default.yaml`` unless ``--routing``), starts ``dylora-moe serve`` on it in a subprocess, and for each
concurrency C in ``--concurrency`` sends ``--requests`` chat requests (greedy, ``--max-tokens``) from C client
threads; then it generates the same prompts with expert 0 merged into the base (``merge_expert``: a plain
transformers model, no routing) in batches of C with ``generate``, in this process. Levels alternate (server,
baseline, next level) so that both see the same machine. It prints requests/s and generated tokens/s of each and
the ratio server / baseline. One command, CPU or GPU (``--device cuda`` puts both on the GPU)::

    python benchmarks/serve_throughput.py --model smollm2-135m --concurrency 1 4 16 --requests 16 --max-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.loading import load_base_model
from dylora_moe.serving.prompts import chat_prompt_ids

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["Write a Python function that reverses a string.", "Write a SQL query that counts the rows of a table.",
         "Write a function that returns the n-th Fibonacci number.", "Sort a list of tuples by their second item.",
         "Check whether a number is prime.", "Merge two sorted lists into one sorted list.",
         "Count the vowels in a string.", "Write a shell command that lists the five largest files.",
         "Remove duplicates from a list, keeping the order.", "Write a JavaScript function that sums an array.",
         "Compute the factorial of n recursively.", "Parse a CSV line into fields.",
         "Return the most common word in a text.", "Flatten a nested list.", "Convert Celsius to Fahrenheit.",
         "Find the longest common prefix of a list of strings."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(adapter: Path, base: str, device: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    server = subprocess.Popen([sys.executable, "-m", "dylora_moe.cli", "serve", str(adapter), "--base-model", base,
                               "--port", str(port), "--max-batch-size", "64"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server stopped:\n{server.stdout.read() if server.stdout else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.5)
    sys.exit("the server did not come up within 300 s")


def run_server(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[float, int]:
    """Wall time and generated tokens of all ``prompts`` sent by ``concurrency`` client threads."""
    todo, lock, tokens = list(prompts), threading.Lock(), [0]

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if not todo:
                        return
                    prompt = todo.pop()
                reply = http.post(f"{url}/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0})
                reply.raise_for_status()
                with lock:
                    tokens[0] += reply.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, tokens[0]


def run_baseline(merged, tokenizer, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[float, int]:
    """Wall time and generated tokens of plain ``generate`` over ``prompts`` in batches of ``concurrency``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(prompts), concurrency):
        rows = [chat_prompt_ids([{"role": "user", "content": p}], tokenizer) for p in prompts[i:i + concurrency]]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=merged.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=merged.device)
        with torch.no_grad():
            out = merged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                                  pad_token_id=pad)
        for row in out[:, width:].tolist():
            tokens += row.index(eos) + 1 if eos in row else len(row)
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--routing", default=None, help="sequence or token (default: configs/default.yaml's)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    import yaml

    moe = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())["moe"]
    routing = args.routing or moe.get("routing", "token")
    base, tokenizer = load_base_model(args.model)
    config = DyLoRAMoEConfig(num_experts=4, r=16, alpha=32, routing=routing)
    model = DyLoRAMoEForCausalLM(base, config, mature=True, base_name_or_path=args.model)
    torch.manual_seed(0)
    for layer in model.expert_layers:  # non-zero experts, so that merging and routing are not trivial
        for b in layer.lora_B:
            torch.nn.init.normal_(b.data, std=0.01)
    prompts = [TASKS[i % len(TASKS)] for i in range(args.requests)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "adapter")
        merged = model.merge_expert(0).to(args.device).eval()
        server, url = start_server(Path(tmp) / "adapter", args.model, args.device)
        try:
            run_server(url, prompts[:2], 2, 4)  # warm-up
            run_baseline(merged, tokenizer, prompts[:2], 2, 4)
            for c in args.concurrency:
                s_time, s_tokens = run_server(url, prompts, c, args.max_tokens)
                b_time, b_tokens = run_baseline(merged, tokenizer, prompts, c, args.max_tokens)
                rows.append({"concurrency": c, "routing": routing, "server_req_s": len(prompts) / s_time,
                             "server_tok_s": s_tokens / s_time, "baseline_req_s": len(prompts) / b_time,
                             "baseline_tok_s": b_tokens / b_time, "server_tokens": s_tokens,
                             "baseline_tokens": b_tokens})
                r = rows[-1]
                print(f"C={c:>3}  serve {r['server_req_s']:.2f} req/s {r['server_tok_s']:.1f} tok/s  |  merged "
                      f"expert, plain generate {r['baseline_req_s']:.2f} req/s {r['baseline_tok_s']:.1f} tok/s  |  "
                      f"ratio {r['server_tok_s'] / r['baseline_tok_s']:.2f}x tok/s", flush=True)
        finally:
            server.terminate()
            server.wait(30)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

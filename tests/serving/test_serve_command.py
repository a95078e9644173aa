"""``dylora-moe serve`` for real: the command in a subprocess on a saved tiny adapter, spoken to over HTTP by
concurrent clients (one streaming), then a malformed request, then a good one again."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from tests.tiny import make_base, make_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_answers_concurrent_clients_over_http(tmp_path):
    base_dir = tmp_path / "base"
    make_base("llama").save_pretrained(base_dir)
    make_tokenizer().save_pretrained(base_dir)
    torch.manual_seed(0)
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=2, r=4, alpha=8, routing="sequence"),
                                 mature=True, base_name_or_path=str(base_dir))
    model.save_pretrained(tmp_path / "adapter")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    server = subprocess.Popen([sys.executable, "-m", "dylora_moe.cli", "serve", str(tmp_path / "adapter"),
                               "--port", str(port), "--batch-wait-ms", "200", "--max-total-tokens", "64"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        replies: dict[int, object] = {}

        def ask(i: int) -> None:
            replies[i] = httpx.post(f"{url}/v1/completions", json={"model": "adapter", "prompt": f"add two {i}",
                                                                   "max_tokens": 5, "temperature": 0}, timeout=60)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "sort the list"}], "max_tokens": 5,
                                "temperature": 0, "stream": True}) as streamed:
            lines = [line for line in streamed.iter_lines() if line]
        for t in threads:
            t.join()
        assert all(replies[i].status_code == 200 for i in range(4))
        assert all(replies[i].json()["choices"][0]["dylora_moe"]["expert"] in (0, 1) for i in range(4))
        assert lines[-1] == "data: [DONE]" and len(lines) >= 3
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert httpx.get(f"{url}/health").json()["largest_batch"] >= 2  # the concurrent requests shared a batch

        bad = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "x", ', timeout=10,
                         headers={"content-type": "application/json"})
        assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]["message"]
        again = httpx.post(f"{url}/v1/completions", json={"prompt": "add", "max_tokens": 2}, timeout=60)
        assert again.status_code == 200 and again.json()["model"] == "adapter"
    finally:
        server.terminate()
        server.wait(30)


def test_serve_options_are_checked_before_anything_loads(tmp_path, capsys):
    from dylora_moe.cli import main, parse_arguments
    from dylora_moe.cli.options import config_from_options
    from dylora_moe.cli.serve_commands import ServeOptions

    assert main(["serve", str(tmp_path / "missing"), "--port", "70000"]) == 2
    assert "--port=70000: must be in 0..65535" in capsys.readouterr().err
    ns = parse_arguments(["serve", "ckpt", "--use-chat-template", "false", "--max-batch-size", "4"])
    options = config_from_options(ServeOptions, ns, overrides=False)
    assert options.use_chat_template is False and options.max_batch_size == 4  # a boolean of a `bool | None` field
    ns = parse_arguments(["generate", "ckpt", "--prompt", "yes"])
    from dylora_moe.cli.model_commands import GenerateOptions

    assert config_from_options(GenerateOptions, ns, overrides=False).prompt == "yes"  # text stays text

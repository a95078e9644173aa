"""``dylora-moe serve``'s application and engine on a tiny routed model (FastAPI's test client, in-process):
OpenAI-shaped replies equal to plain generation, streaming, batching of concurrent requests, stop strings,
seeded sampling, and bad requests answered with a 400 that names the problem while the server stays up."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from fastapi.testclient import TestClient

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.serving.app import create_app
from dylora_moe.serving.engine import Engine
from dylora_moe.serving.prompts import chat_prompt_ids
from tests.tiny import make_base, make_tokenizer

PROMPT = "write a function to add two numbers"


def tiny_model(routing: str = "sequence") -> DyLoRAMoEForCausalLM:
    torch.manual_seed(0)
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=2, r=4, alpha=8, routing=routing),
                                 mature=True)
    for layer in model.expert_layers:
        for b in layer.lora_B:
            torch.nn.init.normal_(b.data, std=0.5)
    return model.eval()


@pytest.fixture(scope="module")
def served():
    model, tokenizer = tiny_model(), make_tokenizer()
    engine = Engine(model, tokenizer, max_batch_size=8, batch_wait_s=0.3, max_total_tokens=48).start()
    app = create_app(engine, model_name="tiny", chat_prompt=lambda m: chat_prompt_ids(m, tokenizer))
    with TestClient(app) as client:
        yield client, engine, model, tokenizer
    engine.stop()


def solo_greedy(model, tokenizer, ids: list[int], max_new: int) -> tuple[str, int]:
    """Plain greedy generation of one prompt, and the expert the model routes it to."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expert = int(model(input_ids=torch.tensor([ids])).expert_choice[0])
    tokens = out[0, len(ids):].tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens, skip_special_tokens=True), expert


def events(response) -> list:
    lines = [line for line in response.text.split("\n\n") if line.strip()]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_completion_equals_plain_generation_and_reports_the_expert(served):
    client, _, model, tokenizer = served
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    text, expert = solo_greedy(model, tokenizer, ids, 6)
    choice = body["choices"][0]
    assert body["object"] == "text_completion" and choice["text"] == text
    assert choice["dylora_moe"]["expert"] == expert and len(choice["dylora_moe"]["router_probs"]) == 2
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["usage"]["total_tokens"] == len(ids) + body["usage"]["completion_tokens"]
    assert choice["finish_reason"] in ("length", "stop")


def test_chat_is_the_training_prompt_and_streams_the_same_text(served):
    client, _, model, tokenizer = served
    ask = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=ask).json()
    text, _ = solo_greedy(model, tokenizer, chat_prompt_ids(ask["messages"], tokenizer), 6)
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["content"] == text
    streamed = client.post("/v1/chat/completions", json={**ask, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    chunks = events(streamed)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]

    completion = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                                      "stream": True})
    parts = events(completion)
    assert "".join(c["choices"][0]["text"] for c in parts) == solo_greedy(
        model, tokenizer, tokenizer(PROMPT, add_special_tokens=False)["input_ids"], 6)[0]


def test_concurrent_requests_are_batched(served):
    client, engine, _, _ = served
    before = engine.stats.largest_batch
    results: list = [None] * 6

    def ask(i: int) -> None:
        results[i] = client.post("/v1/completions", json={"prompt": f"{PROMPT} {i}", "max_tokens": 4 + i,
                                                          "temperature": 0})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results)
    assert engine.stats.largest_batch >= 2 > before - 1
    for i, r in enumerate(results):  # each row stops at its own limit inside the shared batch
        assert r.json()["usage"]["completion_tokens"] <= 4 + i


def test_stop_strings_and_seeded_sampling(served):
    client, _, _, _ = served
    full = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0}).json()
    text = full["choices"][0]["text"]
    words = text.split()
    assert len(words) >= 2, text
    stop = words[1]
    cut = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                               "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"
    ask = {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 7}
    first, second = (client.post("/v1/completions", json=ask).json()["choices"][0]["text"] for _ in range(2))
    assert first == second


@pytest.mark.parametrize("body,status,needle", [
    ("{not json", 400, "malformed JSON body"),
    ({"prompt": PROMPT, "max_tokens": 4, "frequency_penalty_typo": 1}, 400, "unknown field 'frequency_penalty_typo'"),
    ({"prompt": PROMPT, "temperature": "hot"}, 400, "field 'temperature'"),
    ({"max_tokens": 4}, 400, "missing field 'prompt'"),
    ({"prompt": PROMPT, "max_tokens": 45}, 400, "exceed this server's limit of 48"),
    ({"prompt": PROMPT, "n": 2}, 400, "n=2"),
    ({"prompt": PROMPT, "model": "gpt-4"}, 400, "model 'gpt-4' is not served here"),
    ({"prompt": PROMPT, "max_tokens": 0}, 400, "field 'max_tokens'"),
])
def test_bad_requests_get_a_clear_400_and_the_server_stays_up(served, body, status, needle):
    client = served[0]
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) \
        else {"json": body}
    r = client.post("/v1/completions", **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"
    assert client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_chat_errors_name_the_messages(served):
    client = served[0]
    r = client.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "hi"}]})
    assert r.status_code == 400 and "the last message must be the user's" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]})
    assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["message"]


def test_a_failing_batch_fails_its_requests_only(served, monkeypatch):
    client, engine, model, _ = served
    original = model.generate
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory (simulated)")
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", flaky)
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 500 and "out of memory (simulated)" in r.json()["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_token_routing_reports_the_prompts_majority_expert():
    model, tokenizer = tiny_model("token"), make_tokenizer()
    engine = Engine(model, tokenizer, batch_wait_s=0.0).start()
    try:
        ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        done = engine.submit(__import__("dylora_moe.serving.engine", fromlist=["Request"]).Request(
            ids, max_new_tokens=3, temperature=0)).result(timeout=60)
        assert done.expert in (0, 1) and len(done.router_probs) == 2
        assert done.text == solo_greedy(model, tokenizer, ids, 3)[0]
    finally:
        engine.stop()

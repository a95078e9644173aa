"""The serving bundle (``dylora_moe.serving.bundle``): adapters PEFT loads, and a route.py that routes as the model.

Tiny sequence-routed models (tests/tiny.py) with non-zero experts, random routers and calibrated feature
statistics, so that different prompts go to different experts. Run with
``.venv/bin/pytest tests/serving/test_bundle.py -q`` (offline, seconds).
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from peft import PeftModel

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.cli import bundle_commands
from dylora_moe.data import Example, build_prompt_ids
from dylora_moe.serving.bundle import export_bundle
from tests.tiny import CHAT_TEMPLATE, make_base, make_tokenizer, randomize_experts

#: instructions (and inputs) of the tiny vocabulary: different words, different mean embeddings
PROMPTS = [("add two numbers", ""), ("write a function to sort the list", ""), ("print hello world", ""),
           ("return a + b", "x y"), ("def f ( x , y )", ""), ("assert f ( 1 ) == 2", "some context"),
           ("sort the list [ 3 , 1 , 2 ]", ""), ("You are an expert Python programmer", "and here is your task"),
           ("9 * 8 - 7 / 6", ""), ("Your code should pass these tests .", "assert f ( ) == 0"),
           ("{ } [ ] ( )", ""), ("hello", "world")]


def sequence_model(tokenizer, router_type="linear", **cfg):
    """A mature sequence-routed tiny model with non-zero experts and a random, calibrated router."""
    config = DyLoRAMoEConfig(num_experts=4, r=4, alpha=8, routing="sequence", dropout=0.0, router_type=router_type,
                             router_hidden=32, **cfg)
    model = DyLoRAMoEForCausalLM(make_base("llama"), config, mature=True)
    randomize_experts(model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.router_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 2.0)
    prompts = [torch.tensor([build_prompt_ids(Example("t", i, x), tokenizer)]) for i, x in PROMPTS]
    model.calibrate_router({"input_ids": ids} for ids in prompts)
    return model.eval()


def load_route(bundle: Path) -> ModuleType:
    """The bundle's route.py, imported from its path (in-process, under a name of its own)."""
    name = f"bundle_route_{abs(hash(str(bundle)))}"
    spec = importlib.util.spec_from_file_location(name, bundle / "route.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def assert_routes_as_model(model, tokenizer, bundle: Path) -> None:
    router = load_route(bundle).BundleRouter.from_dir(bundle)
    chosen = set()
    for instruction, extra in PROMPTS:
        ids = build_prompt_ids(Example("t", instruction, extra), tokenizer)
        assert router.prompt_ids(instruction, extra) == ids
        adapter, probs = router.choose(ids)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]))
        assert adapter == f"expert_{int(out.expert_choice[0])}", instruction
        assert torch.allclose(torch.tensor(probs), out.router_probs[0], atol=1e-5, rtol=0)
        chosen.add(adapter)
    assert len(chosen) >= 2, f"routing is trivial: every prompt went to {chosen}"  # the test would prove nothing


@pytest.mark.parametrize(("router_type", "chat", "cfg"), [
    ("linear", False, {}),
    ("mlp", True, {"temperature": 0.5}),
    ("linear", False, {"expert_init": "svd", "scaling": "goat", "temperature": 2.0}),  # folded adapters
])
def test_bundle_adapters_load_in_peft_and_route_py_routes_as_the_model(tmp_path, batch, router_type, chat, cfg):
    tokenizer = make_tokenizer(CHAT_TEMPLATE if chat else None, bos=None if chat else "<bos>")
    model = sequence_model(tokenizer, router_type, **cfg)
    bundle = export_bundle(model, tokenizer, tmp_path / "bundle")

    meta = json.loads((bundle / "router" / "router.json").read_text())
    assert meta["adapters"] == [f"expert_{i}" for i in range(4)] and meta["exact"]
    assert meta["router"]["kind"] == router_type and meta["prompt_format"]["chat_template"] is chat
    readme = (bundle / "README.md").read_text()
    assert "--enable-lora" in readme and "expert_3=adapters/expert_3" in readme
    assert f"--max-lora-rank {meta['max_lora_rank']}" in readme and meta["max_lora_rank"] >= max(meta["adapter_ranks"])

    ids, mask, _ = batch
    for i in range(model.num_experts):
        peft_model = PeftModel.from_pretrained(make_base("llama"), str(bundle / "adapters" / f"expert_{i}")).eval()
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask, forced_expert=i).logits
            got = peft_model(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(got, want, atol=1e-5), i
    assert_routes_as_model(model, tokenizer, bundle)


def test_route_py_agrees_with_the_routing_generate_pins_for_a_padded_batch(tmp_path):
    tokenizer = make_tokenizer(bos="<bos>")
    model = sequence_model(tokenizer)
    router = load_route(export_bundle(model, tokenizer, tmp_path / "bundle")).BundleRouter.from_dir(tmp_path / "bundle")
    prompts = [router.prompt_ids(i, x) for i, x in PROMPTS]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding, as generation pads
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    seen = []
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                   on_prompt_routing=lambda choice, probs: seen.append((choice, probs)))
    (choice, probs), = seen
    for row, prompt in enumerate(prompts):
        adapter, p = router.choose(prompt)
        assert adapter == f"expert_{int(choice[row])}"
        assert torch.allclose(torch.tensor(p), probs[row], atol=1e-5, rtol=0)


def test_route_py_runs_as_a_script(tmp_path, capsys):
    tokenizer = make_tokenizer(bos="<bos>")
    model = sequence_model(tokenizer)
    bundle = export_bundle(model, tokenizer, tmp_path / "bundle")
    route = load_route(bundle)
    assert route.main(["--bundle", str(bundle), "--json", "add two numbers"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["prompt_token_ids"] == build_prompt_ids(Example("t", "add two numbers"), tokenizer)
    assert route.main(["--bundle", str(bundle), "--ids", ",".join(map(str, printed["prompt_token_ids"]))]) == 0
    assert capsys.readouterr().out.strip() == printed["adapter"]


def test_a_token_routed_model_is_refused_clearly(tmp_path):
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=2, r=4, routing="token"), mature=True)
    with pytest.raises(ValueError, match=r"routing='token'.*cannot be expressed as one LoRA adapter per request"):
        export_bundle(model, make_tokenizer(), tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_inexact_serving_is_refused_unless_approximate(tmp_path):
    tokenizer = make_tokenizer()
    model = sequence_model(tokenizer)
    model.set_maturity(1, False)  # dense: every request mixes every expert
    with pytest.raises(ValueError, match="routing mode is dense.*approximate=True"):
        export_bundle(model, tokenizer, tmp_path / "bundle")
    bundle = export_bundle(model, tokenizer, tmp_path / "bundle", approximate=True)
    meta = json.loads((bundle / "router" / "router.json").read_text())
    assert not meta["exact"] and "dense" in meta["approximations"][0]
    assert "**Approximate**" in (bundle / "README.md").read_text()


def parse(argv):
    parser = argparse.ArgumentParser(prog="dylora-moe")
    bundle_commands.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.mark.parametrize("plain_by", [None, "option", "train_config"])
def test_export_bundle_command_writes_the_bundle_of_a_saved_checkpoint(tmp_path, capsys, plain_by):
    """A checkpoint trained on plain prompts (a tokenizer without a chat template, or --prompt-format plain, or the
    run's train_config.json saying so) gets a route.py that builds the plain prompts."""
    tokenizer = make_tokenizer(CHAT_TEMPLATE if plain_by else None)
    base_dir = tmp_path / "base"
    make_base("llama").save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = sequence_model(tokenizer)
    model.base_name_or_path = str(base_dir)
    model.save_pretrained(tmp_path / "run" / "final")
    if plain_by == "train_config":
        (tmp_path / "run" / "train_config.json").write_text(json.dumps({"data": {"use_chat_template": False}}))
    ns = parse(["export-bundle", str(tmp_path / "run"), str(tmp_path / "out"),
                *(["--prompt-format", "plain"] if plain_by == "option" else [])])
    assert ns.func(ns) == 0
    printed = capsys.readouterr().out
    assert "vllm serve " + str(base_dir) in printed and "expert_0=adapters/expert_0" in printed
    meta = json.loads((tmp_path / "out" / "router" / "router.json").read_text())
    assert meta["base_model"]["name_or_path"] == str(base_dir) and meta["prompt_format"]["chat_template"] is False
    assert_routes_as_model(model, make_tokenizer(), tmp_path / "out")  # the plain prompts


def test_export_bundle_command_refuses_a_token_routed_checkpoint_before_loading_its_base(tmp_path):
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=2, r=4, routing="token"), mature=True,
                                 base_name_or_path=str(tmp_path / "no-such-base"))
    model.save_pretrained(tmp_path / "ckpt")
    ns = parse(["export-bundle", str(tmp_path / "ckpt"), str(tmp_path / "out")])
    with pytest.raises(ValueError, match="routing='token'"):
        ns.func(ns)
    assert not (tmp_path / "out").exists()


def test_export_bundle_command_refuses_an_unknown_prompt_format(tmp_path):
    from dylora_moe import ConfigError

    ns = parse(["export-bundle", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--prompt-format", "xml"])
    with pytest.raises(ConfigError, match="--prompt-format='xml': must be one of"):
        ns.func(ns)

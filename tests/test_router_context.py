"""Token routers that see the prompt (``router_context='prompt'``): what the context changes, what it must not, and
that it survives growth, surgery, generation, calibration and a save/load round trip."""

import pytest
import torch

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.errors import ConfigError
from dylora_moe.router import build_router
from dylora_moe.surgery import remove_experts
from tests.tiny import VOCAB, make_base, randomize_experts


def build(arch="llama", **cfg):
    cfg = {"dropout": 0.0, "router_context": "prompt", **cfg}
    return DyLoRAMoEForCausalLM(make_base(arch), DyLoRAMoEConfig(**cfg), mature=True)


def prompts_then_same_completion(seed=4):
    """Two sequences whose 6-token prompts differ and whose 6-token completions are the same tokens."""
    gen = torch.Generator().manual_seed(seed)
    completion = torch.randint(3, VOCAB, (6,), generator=gen)
    ids = torch.stack([torch.cat([torch.randint(3, VOCAB, (6,), generator=gen), completion]) for _ in range(2)])
    labels = ids.clone()
    labels[:, :6] = -100
    return ids, labels


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_router_context_term_broadcasts_over_positions(kind):
    router = build_router(kind, 8, 3)
    feats = torch.randn(2, 5, 8)
    plain = router.logits(feats)
    router.use_context(6)
    assert router.context_weight is not None and router.context_weight.shape == (3, 6)
    context = torch.randn(2, 6)
    with_context = router.logits(feats, context)
    shift = with_context - plain  # [2, 5, 3]: one vector per sequence, the same at every position
    assert shift.shape == (2, 5, 3)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-6)
    assert not torch.allclose(shift[0, 0], shift[1, 0])
    with pytest.raises(ValueError, match="needs a context"):
        router.logits(feats)
    with pytest.raises(ValueError, match="already has a context"):
        router.use_context(6)
    with pytest.raises(ValueError, match="without a context input"):
        build_router(kind, 8, 3).logits(feats, context)


def test_router_context_growth_keeps_old_rows():
    router = build_router("linear", 8, 3)
    router.use_context(6)
    feats, context = torch.randn(2, 4, 8), torch.randn(2, 6)
    before = router.logits(feats, context).detach()
    router.add_expert()
    after = router.logits(feats, context).detach()
    assert after.shape == (2, 4, 4) and router.context_weight.shape == (4, 6)
    assert torch.allclose(after[..., :3], before, rtol=1e-6, atol=1e-6)


def test_config_refuses_a_context_without_token_routing():
    with pytest.raises(ConfigError, match="router_context.*routing='token'"):
        DyLoRAMoEConfig(routing="sequence", router_context="prompt")
    with pytest.raises(ConfigError, match="router_context='pooled'"):
        DyLoRAMoEConfig(router_context="pooled")


def test_fresh_model_still_equals_base_and_experts_start_as_without_context(batch):
    ids, mask, _ = batch
    model = build()
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                       make_base()(input_ids=ids, attention_mask=mask).logits)
    plain = build(router_context="none", expert_init="svd", scaling="goat", num_experts=2, r=8)
    ctx = build(expert_init="svd", scaling="goat", num_experts=2, r=8)
    for a, b in zip(plain.expert_layers, ctx.expert_layers):
        assert all(torch.equal(x, y) for x, y in zip(a.lora_A, b.lora_A))
    for a, b in zip(plain.routers, ctx.routers):
        assert torch.equal(a.weight, b.weight) and b.context_weight is not None and a.context_weight is None


def test_the_prompt_sways_every_token_s_choice_and_the_completion_does_not_move_the_context():
    ids, labels = prompts_then_same_completion()
    plain, ctx = build(router_context="none"), build()
    # block 0 routes from the input embeddings, so the same completion tokens give the same plain logits
    p0 = plain(input_ids=ids, labels=labels).decision_probs[0]
    assert torch.allclose(p0[0, 6:], p0[1, 6:])
    c0 = ctx(input_ids=ids, labels=labels).decision_probs[0]
    assert not torch.allclose(c0[0, 6:], c0[1, 6:], atol=1e-3)
    # with labels the context is the prompt's: other completion tokens leave the prompt positions' routing as it was
    other = ids.clone()
    other[:, 6:] = (other[:, 6:] + 5) % (VOCAB - 3) + 3
    c0_other = ctx(input_ids=other, labels=labels).decision_probs[0]
    assert torch.allclose(c0_other[:, :6], c0[:, :6])


def test_the_context_weight_learns(batch):
    ids, mask, labels = batch
    model = build()
    randomize_experts(model)
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    grads = [r.context_weight.grad for r in model.routers]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.requires_grad for p in model.router_parameters())
    assert {id(r.context_weight) for r in model.routers} <= {id(p) for p in model.trainable_parameters()}


@pytest.mark.exact
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_with_and_without_cache(arch):
    model = build(arch)
    randomize_experts(model, std=0.5)
    ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**kw), model.generate(use_cache=False, **kw))
    assert model.context.pinned_context is None  # nothing of the generation is left for the next one


def test_generation_pins_the_prompt_s_context():
    model = build()
    randomize_experts(model, std=0.5)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    prompt_context = model._sequence_features(ids, None, torch.ones_like(ids, dtype=torch.bool))
    seen = []
    hook = model.base_model.register_forward_hook(lambda *a: seen.append(model.context.prompt_context.clone()))
    try:
        model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False)
    finally:
        hook.remove()
    assert len(seen) == 4  # the prompt's context at every step, though later passes also hold generated tokens
    for context in seen:
        assert torch.equal(context, prompt_context)


def test_calibration_sets_the_context_statistics():
    base = make_base("llama")
    with torch.no_grad():
        base.get_input_embeddings().weight.add_(torch.linspace(-3.0, 3.0, 64))
    model = DyLoRAMoEForCausalLM(base, DyLoRAMoEConfig(router_context="prompt", dropout=0.0), mature=True)
    ids = torch.randint(3, VOCAB, (16, 8), generator=torch.Generator().manual_seed(9))
    labels = ids.clone()
    labels[:, :5] = -100
    model.calibrate_router([{"input_ids": ids, "labels": labels}])
    pooled = base.get_input_embeddings()(ids[:, :5]).float().mean(1)  # the prompts' mean embeddings
    for router in model.routers:
        assert torch.allclose(router.context_mean, pooled.mean(0), atol=1e-5)
        assert torch.allclose(router.context_std, pooled.std(0), atol=1e-5)


def test_save_load_round_trip_and_surgery(tmp_path, batch):
    ids, mask, labels = batch
    model = build()
    randomize_experts(model)
    with torch.no_grad():
        for router in model.routers:
            router.context_weight.normal_()
            router.set_context_stats(torch.randn(64), torch.rand(64) + 0.5)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, labels=labels)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=make_base("llama"))
    assert loaded.moe_config.router_context == "prompt"
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(got.logits, expected.logits)
    for a, b in zip(model.routers, loaded.routers):
        assert torch.equal(a.context_weight, b.context_weight) and torch.equal(a.context_std, b.context_std)
    rows = [r.context_weight.detach()[[0, 2, 3]].clone() for r in loaded.routers]
    remove_experts(loaded, [1])
    for router, kept in zip(loaded.routers, rows):
        assert torch.equal(router.context_weight, kept)
    out = loaded(input_ids=ids, attention_mask=mask)
    assert out.expert_share.shape == (3,)


def test_the_body_alone_runs_bare_for_pooled_states_and_otherwise_says_what_is_wrong(batch):
    """Pooled final states for the skill library run the transformer body alone, bare (no routing), after passes
    of other batch sizes (as joint training's end does); routed without a prompt, the body is an error that says
    what to call instead."""
    from dylora_moe.continual.library import pooled_states
    from dylora_moe.data import Example
    from tests.tiny import make_tokenizer

    ids, mask, labels = batch
    model = build()
    randomize_experts(model)  # experts that would change the states if they ran
    model(input_ids=ids, attention_mask=mask, labels=labels)  # a pass of 3 sequences
    examples = [Example(instruction=f"add {i} and 2", input="", output=f"return {i} + 2", domain="math")
                for i in range(5)]
    states = pooled_states(model, make_tokenizer(), examples, batch_size=4)
    assert states.shape == (5, 64) and torch.isfinite(states).all()
    with model.bare():
        bare = model.base_model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    frozen = make_base().base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(bare, frozen)
    with pytest.raises(RuntimeError, match="sees the prompt.*call the DyLoRAMoEForCausalLM wrapper"):
        model.base_model.base_model(input_ids=ids, attention_mask=mask)

"""Tests of DyLoRAMoEForCausalLM: identity at init, routing modes, gradients, growth, generation."""

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from tests.tiny import ARCHS, VOCAB, make_base, randomize_experts


def build(arch="llama", mature=True, **cfg):
    cfg.setdefault("dropout", 0.0)
    return DyLoRAMoEForCausalLM(make_base(arch), DyLoRAMoEConfig(**cfg), mature=mature)


@pytest.mark.exact
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("routing", ["sequence", "token"])
@pytest.mark.parametrize("mature", [True, False])
def test_fresh_model_equals_base(arch, routing, mature, batch):
    ids, mask, _ = batch
    reference = make_base(arch)(input_ids=ids, attention_mask=mask).logits
    model = build(arch, mature=mature, routing=routing)
    out = model(input_ids=ids, attention_mask=mask)
    assert torch.equal(out.logits, reference)
    assert out.routing_mode == ("sparse" if mature else "dense")


@pytest.mark.parametrize("arch", ARCHS)
def test_only_experts_and_router_train(arch):
    model = build(arch, target_modules="all-linear")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".lora_A." in n or ".lora_B." in n or n.startswith("routers.") for n in trainable)
    lm_head = model.base_model.get_output_embeddings().weight
    assert not lm_head.requires_grad
    assert not model.base_model.get_input_embeddings().weight.requires_grad


def test_mode_follows_maturity_and_override(batch):
    ids, mask, _ = batch
    model = build(mature=False, routing="sequence")
    assert model.routing_mode == "dense"
    out = model(input_ids=ids, attention_mask=mask)
    assert out.routing_mode == "dense"
    # dense: every expert gets a share
    assert (out.expert_share > 0).all()
    for i in range(model.num_experts - 1):
        model.set_maturity(i, True)
    assert model.routing_mode == "dense"
    model.set_maturity(model.num_experts - 1, True)
    out = model(input_ids=ids, attention_mask=mask)
    assert out.routing_mode == "sparse"
    # sparse top-1 over 3 sequences: shares are multiples of 1/3
    assert torch.allclose(out.expert_share * 3, (out.expert_share * 3).round())
    model.moe_config.routing_mode = "dense"
    assert model(input_ids=ids, attention_mask=mask).routing_mode == "dense"
    model.moe_config.routing_mode = "auto"
    model.add_expert()
    assert model.routing_mode == "dense"


def test_top1_gradients(batch):
    ids, mask, labels = batch
    model = build(routing="sequence", num_experts=4, top_k=1)
    randomize_experts(model)
    out = model(input_ids=ids[:1], attention_mask=mask[:1], labels=labels[:1])
    out.lm_loss.backward()
    chosen = int(out.expert_choice[0])
    for layer in model.expert_layers:
        for e in range(model.num_experts):
            grad = layer.lora_B[e].grad
            if e == chosen:
                assert grad is not None and grad.abs().sum() > 0
            else:
                assert grad is None or torch.count_nonzero(grad) == 0
    # the router learns from the LM loss alone (no aux term in lm_loss)
    router_grad = torch.cat([p.grad.flatten() for p in model.router_parameters() if p.grad is not None])
    assert router_grad.abs().sum() > 0


def test_token_routing_unselected_expert_gets_zero_grad(batch):
    ids, mask, labels = batch
    model = build(routing="token", num_experts=4)
    randomize_experts(model)
    # make expert 3 never the first choice: a very negative bias in every router
    with torch.no_grad():
        for router in model.routers:
            router.bias[3] = -1e4
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.expert_share[3] == 0
    out.loss.backward()
    for layer in model.expert_layers:
        assert torch.count_nonzero(layer.lora_A[3].grad) == 0
        assert torch.count_nonzero(layer.lora_B[0].grad) > 0


def test_optimizer_step_changes_only_trainable(batch):
    ids, mask, labels = batch
    model = build(routing="sequence")
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    changed = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert any("lora_B" in n for n in changed) and any(n.startswith("routers.") for n in changed)


def test_loss_is_lm_plus_weighted_aux(batch):
    ids, mask, labels = batch
    model = build(balance_coef=0.5, balance_loss="switch")
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.allclose(out.loss, out.lm_loss + 0.5 * out.aux_loss)
    assert out.aux_loss.requires_grad
    assert torch.isclose(out.expert_share.sum(), torch.tensor(1.0))
    assert 0 <= out.router_entropy <= torch.log(torch.tensor(4.0)) + 1e-6
    assert out.router_probs.shape == (3, 4)
    assert not hasattr(model, "last_aux_loss")


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_z_loss_and_similarity_loss_join_the_loss(routing, batch):
    ids, mask, labels = batch
    plain = build(routing=routing)
    out = plain(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.z_loss is None and out.ortho_loss is None  # off by default: nothing computed
    model = build(routing=routing, z_loss_coef=0.1, ortho_coef=0.5)
    randomize_experts(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.z_loss > 0 and 0 < out.ortho_loss <= 1
    want = out.lm_loss + model.moe_config.balance_coef * out.aux_loss + 0.1 * out.z_loss + 0.5 * out.ortho_loss
    assert torch.allclose(out.loss, want)
    assert torch.allclose(out.ortho_loss, model.similarity_loss())
    out.ortho_loss.backward(retain_graph=True)
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in model.expert_layers[0].lora_B)
    model.zero_grad()
    out.z_loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.routers.parameters() if p.dim() == 2)
    if routing == "sequence":  # routed from the input embeddings: the z-loss reaches the router only
        assert all(p.grad is None for p in model.expert_parameters())


def test_similarity_loss_pushes_experts_apart(batch):
    model = build(num_experts=2, r=4, alpha=8)
    with torch.no_grad():
        for layer in model.expert_layers:
            layer.lora_B[1].copy_(torch.randn_like(layer.lora_B[1]))
            layer.lora_B[0].copy_(layer.lora_B[1])
            layer.lora_A[0].copy_(layer.lora_A[1])  # two identical experts: similarity 1
    assert torch.isclose(model.similarity_loss(), torch.tensor(1.0))
    optimizer = torch.optim.SGD(model.expert_parameters(), lr=0.5)
    for _ in range(20):
        optimizer.zero_grad()
        with torch.no_grad():
            for layer in model.expert_layers:  # break the exact symmetry
                layer.lora_A[0].add_(1e-3 * torch.randn_like(layer.lora_A[0]))
        model.similarity_loss().backward()
        optimizer.step()
    assert model.similarity_loss() < 0.5


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_forced_expert_per_sequence(routing, batch):
    ids, mask, _ = batch
    model = build(routing=routing)
    randomize_experts(model)
    with torch.no_grad():
        rows = model(input_ids=ids, attention_mask=mask, forced_expert=torch.tensor([2, 0, 3])).logits
        for row, expert in enumerate([2, 0, 3]):
            alone = model(input_ids=ids, attention_mask=mask, forced_expert=expert).logits
            assert torch.allclose(rows[row], alone[row], atol=1e-5)
    with pytest.raises(IndexError, match="out of range for 4 experts"):
        model(input_ids=ids, attention_mask=mask, forced_expert=torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="one expert per sequence"):
        model(input_ids=ids, attention_mask=mask, forced_expert=torch.tensor([0, 1]))


def test_sequence_routing_uses_prompt_only(batch):
    ids, mask, labels = batch
    model = build(routing="sequence")
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    # changing completion tokens (labelled positions) must not change the routing
    ids2 = ids.clone()
    ids2[:, 6:] = (ids2[:, 6:] + 7) % VOCAB
    out2 = model(input_ids=ids2, attention_mask=mask, labels=labels)
    assert torch.equal(out.router_probs, out2.router_probs)
    # without labels the prompt is the whole input; routing_mask selects explicitly
    prompt_mask = labels.eq(-100) & mask.bool()
    out3 = model(input_ids=ids, attention_mask=mask, routing_mask=prompt_mask)
    assert torch.allclose(out.router_probs, out3.router_probs)


@pytest.mark.exact
@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_add_expert_keeps_old_experts(routing, batch):
    ids, mask, _ = batch
    model = build(routing=routing)
    randomize_experts(model)
    with torch.no_grad():  # the inference kernels promise bit-exactness (the training ones stack all experts)
        before = [model(input_ids=ids, attention_mask=mask, forced_expert=i).logits for i in range(4)]
    rows = [r.weight.detach().clone() for r in model.routers]
    new = model.add_expert(rank=32)
    assert new == 4 and model.expert_ranks == [16, 16, 16, 16, 32] and model.maturity[-1] is False
    with torch.no_grad():
        for i in range(4):
            assert torch.equal(model(input_ids=ids, attention_mask=mask, forced_expert=i).logits, before[i])
    for r, old in zip(model.routers, rows):
        assert r.weight.shape[0] == 5 and torch.equal(r.weight[:4], old)
    # the new expert starts with B = 0: forcing it gives the base output
    base_logits = make_base("llama")(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(model(input_ids=ids, attention_mask=mask, forced_expert=4).logits, base_logits)
    out = model(input_ids=ids, attention_mask=mask)
    assert out.routing_mode == "dense" and out.expert_share.shape == (5,)
    model.set_maturity(4, True)
    assert model(input_ids=ids, attention_mask=mask).routing_mode == "sparse"


@pytest.mark.exact
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_generation_with_and_without_cache(arch, routing):
    model = build(arch, routing=routing)
    randomize_experts(model, std=0.5)
    ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(**kw)
    uncached = model.generate(use_cache=False, **kw)
    assert cached.shape == (3, 13)
    assert torch.equal(cached, uncached)


def test_generation_routes_on_the_prompt(batch):
    model = build(routing="sequence")
    randomize_experts(model, std=0.5)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    prompt_probs = model(input_ids=ids).router_probs
    seen = []
    hook = model.base_model.register_forward_hook(lambda *a: seen.append(model.context.sequence.probs))
    try:
        model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    finally:
        hook.remove()
    assert len(seen) == 4
    for probs in seen:
        assert torch.allclose(probs, prompt_probs)


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_generate_hands_over_the_prompt_routing_of_its_prefill_once(routing):
    """on_prompt_routing gets the routing of generation's own prefill forward, exactly once, equal to a plain
    forward's over each unpadded prompt; the hook is gone afterwards (a later forward does not call it)."""
    model = build(routing=routing)
    randomize_experts(model, std=0.5)
    with torch.no_grad():
        for router in model.routers:
            router.weight.normal_(0.0, 2.0)  # decisive routers: prompts go to different experts
    ids = torch.randint(3, VOCAB, (4, 9), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[3, :2] = 0
    calls = []
    passes = []
    counter = model.base_model.register_forward_hook(lambda *a: passes.append(1))
    try:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                       on_prompt_routing=lambda choice, probs: calls.append((choice.clone(), probs.clone())))
    finally:
        counter.remove()
    assert len(calls) == 1 and len(passes) == 3  # prefill + 2 decode steps, no extra pass over the prompts
    choice, probs = calls[0]
    assert choice.shape == (4,) and probs.shape == (4, model.num_experts)
    for row in range(4):
        real = ids[row, mask[row].bool()].unsqueeze(0)
        alone = model(input_ids=real)
        assert int(choice[row]) == int(alone.expert_choice[0])
        assert torch.allclose(probs[row], alone.router_probs[0], atol=1e-5)
    assert len(set(choice.tolist())) > 1  # the rows really are routed differently
    model(input_ids=ids, attention_mask=mask)
    assert len(calls) == 1


def test_forced_expert_validation(batch):
    ids, mask, _ = batch
    model = build()
    with pytest.raises(IndexError, match="forced_expert=9"):
        model(input_ids=ids, forced_expert=9)
    with pytest.raises(IndexError, match="out of range"):
        model.set_maturity(7, True)


def test_gradient_checkpointing_reaches_experts_and_router(batch):
    ids, mask, labels = batch
    for routing in ("sequence", "token"):
        model = build(routing=routing)
        randomize_experts(model)
        model.train()
        model.gradient_checkpointing_enable()
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.base_model.modules())
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.expert_parameters())
        assert all(p.grad is not None for p in model.routers.parameters() if p.dim() == 2)


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_calibrate_router_spreads_inputs_with_a_common_component(routing):
    base = make_base("llama")
    with torch.no_grad():  # a large component shared by every token, as in real embeddings
        base.get_input_embeddings().weight.add_(torch.linspace(-3.0, 3.0, 64))
    model = DyLoRAMoEForCausalLM(base, DyLoRAMoEConfig(routing=routing, dropout=0.0), mature=True)
    ids = torch.randint(3, VOCAB, (32, 10), generator=torch.Generator().manual_seed(9))
    before = model(input_ids=ids)
    assert before.expert_share.max() > (0.9 if routing == "sequence" else 0.8)  # mostly one expert
    seen = model.calibrate_router([{"input_ids": ids[:16]}, {"input_ids": ids[16:]}])
    assert seen >= 32
    after = model(input_ids=ids)
    assert after.expert_share.max() < 0.7 and (after.expert_share > 0).sum() >= 3
    assert all(not torch.equal(r.feature_std, torch.ones_like(r.feature_std)) for r in model.routers)


@pytest.mark.parametrize("has_logits_to_keep", [True, False])
def test_token_calibration_runs_each_batch_once_with_or_without_logits_to_keep(has_logits_to_keep):
    """Calibration skips the LM head's logits where the base model takes logits_to_keep, decided from its
    signature: a model without it is called once per batch with plain arguments, and no token is counted twice."""
    model = build(routing="token")
    calls = []
    original = model.base_model.forward
    if has_logits_to_keep:
        def forward(input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
            calls.append(logits_to_keep)
            return original(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep, **kwargs)
    else:
        def forward(input_ids=None, attention_mask=None, **kwargs):  # passes unknown arguments on, like many
            calls.append(None)
            out = original(input_ids=input_ids, attention_mask=attention_mask)  # the blocks run (hooks fire)
            if kwargs:  # ... and an inner module rejects the argument only after that
                raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
            return out
    model.base_model.forward = forward
    ids = torch.randint(3, VOCAB, (6, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # padding is not a routing unit
    seen = model.calibrate_router([{"input_ids": ids[:3], "attention_mask": mask[:3]},
                                   {"input_ids": ids[3:], "attention_mask": mask[3:]}])
    assert calls == ([1, 1] if has_logits_to_keep else [None, None])
    assert seen == int(mask.sum())


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_straight_through_gate_gives_each_chosen_expert_full_weight(routing, batch):
    """With gate='straight_through' a routed unit gets its expert at weight 1, as forcing that expert does
    (sequence routing: row by row); the router still learns from the LM loss alone (balance_coef 0)."""
    ids, mask, labels = batch
    model = build(routing=routing, gate="straight_through", balance_coef=0.0)
    randomize_experts(model, std=0.5)
    model.eval()
    out = model(input_ids=ids, attention_mask=mask)
    if routing == "sequence":
        for row in range(ids.shape[0]):
            forced = model(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1],
                           forced_expert=int(out.expert_choice[row]))
            real = mask[row].bool()
            assert torch.allclose(out.logits[row, real], forced.logits[0, real], atol=1e-5)
    probability = build(routing=routing, gate="probability", balance_coef=0.0)
    probability.load_state_dict(model.state_dict())
    probability.eval()
    assert not torch.allclose(probability(input_ids=ids, attention_mask=mask).logits, out.logits, atol=1e-4)
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in model.routers)


@pytest.mark.exact
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_supervised_logits_only_gives_the_same_loss_and_gradients(arch, routing, batch):
    """The LM head on the supervised positions only: the same loss, aux loss, routing and gradients as over the
    full [B, T, V] logits (sequence routing still decides on the prompt, which only the labels mark)."""
    ids, mask, labels = batch
    model = build(arch, routing=routing, balance_coef=0.1)
    randomize_experts(model)  # eval mode (no base dropout in gpt2), gradients still flow
    results = []
    for only in (False, True):
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, supervised_logits_only=only)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (full, full_grads), (only, only_grads) = results
    assert full.logits.shape == (3, 12, VOCAB) and only.logits is None
    assert torch.allclose(only.lm_loss, full.lm_loss, atol=1e-6) and only.lm_loss.dtype == torch.float32
    assert torch.allclose(only.aux_loss, full.aux_loss) and torch.equal(only.router_probs, full.router_probs)
    assert only_grads.keys() == full_grads.keys() and any(n.startswith("routers.") for n in only_grads)
    for name, grad in full_grads.items():
        assert torch.allclose(only_grads[name], grad, atol=1e-6, rtol=1e-4), name
    # without labels there is nothing to select: the usual logits
    plain = model(input_ids=ids, attention_mask=mask, supervised_logits_only=True)
    assert plain.logits.shape == (3, 12, VOCAB) and plain.loss is None


def test_a_training_step_with_labels_uses_the_supervised_head_by_default(batch):
    """``supervised_logits_only=None``: on in a training step (labels, train mode, gradients on), where only the
    loss is used; off in evaluation, under no_grad, without labels and with logits_to_keep."""
    ids, mask, labels = batch
    model = build()
    randomize_experts(model)
    model.train()
    rows = []
    handle = model.base_model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: rows.append(tuple(args[0].shape[:-1])))
    try:
        auto = model(input_ids=ids, attention_mask=mask, labels=labels)
        full = model(input_ids=ids, attention_mask=mask, labels=labels, supervised_logits_only=False)
        with torch.no_grad():
            assert model(input_ids=ids, attention_mask=mask, labels=labels).logits.shape == (3, 12, VOCAB)
        assert model(input_ids=ids, attention_mask=mask, labels=labels, logits_to_keep=0).logits.shape == (3, 12, VOCAB)
        model.eval()
        assert model(input_ids=ids, attention_mask=mask, labels=labels).logits.shape == (3, 12, VOCAB)
    finally:
        handle.remove()
    # the one-token probe of the head (once per model), then the fused loss hands the head no rows; the rest see
    # every position
    assert rows == [(1, 1), (0,), (3, 12), (3, 12), (3, 12), (3, 12)]
    assert auto.logits is None and full.logits.shape == (3, 12, VOCAB)
    assert torch.allclose(auto.lm_loss, full.lm_loss, atol=1e-6)


@pytest.mark.parametrize("items", [7, "tensor"])
def test_the_supervised_head_divides_by_num_items_in_batch_as_transformers_does(batch, items):
    """Gradient accumulation passes ``num_items_in_batch`` (transformers' Trainer does): the loss is the summed
    cross-entropy over it, equal to the base model's own loss with the full logits."""
    ids, mask, labels = batch
    model = build()
    randomize_experts(model)
    count = torch.tensor(7) if items == "tensor" else items
    only = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=count,
                 supervised_logits_only=True)
    full = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=count,
                 supervised_logits_only=False)
    mean = model(input_ids=ids, attention_mask=mask, labels=labels, supervised_logits_only=False)
    supervised = int((labels[:, 1:] != -100).sum())
    assert torch.allclose(only.lm_loss, full.lm_loss, atol=1e-5)
    assert torch.allclose(full.lm_loss, mean.lm_loss * supervised / 7, atol=1e-5)


def test_supervised_logits_only_fuses_the_loss_with_a_frozen_linear_head(batch):
    """The model returns its head's output as its logits: the loss is computed from the head's weight on the N
    supervised rows (no [N, V] logits; the head itself is handed no rows), the same loss and gradients as the head
    on those rows; a head that needs gradients gets the rows and computes the [N, V] logits."""
    ids, mask, labels = batch
    model = build()
    randomize_experts(model)
    head = model.base_model.get_output_embeddings()
    seen, routed = [], []
    handle = head.register_forward_hook(lambda module, args, output: seen.append(tuple(output.shape)))
    router_hooks = [r.register_forward_hook(lambda module, args, output: routed.append(1)) for r in model.routers]
    supervised = int((labels[:, 1:] != -100).sum())
    results = []
    try:
        for trainable_head in (False, True):
            head.weight.requires_grad_(trainable_head)
            model.zero_grad()
            out = model(input_ids=ids, attention_mask=mask, labels=labels, supervised_logits_only=True)
            out.loss.backward()
            results.append((out.lm_loss, [p.grad.clone() for p in model.trainable_parameters()]))
    finally:
        handle.remove()
        for h in router_hooks:
            h.remove()
        head.weight.requires_grad_(False)
    assert seen == [(1, 1, VOCAB), (0, VOCAB), (supervised, VOCAB)] and supervised < ids.numel()
    assert len(routed) == 2 * len(model.routers)  # the probe ran the bare base: no router
    (fused, fused_grads), (plain, plain_grads) = results
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert model._head_is_logits is True


def test_supervised_logits_only_with_soft_capped_logits_keeps_the_model_s_own_logits(batch):
    """Gemma 2 soft-caps its logits after the head: the probe finds that the returned logits are not the head's
    output, so the head computes the [N, V] logits and the model caps them; the loss equals the full logits'."""
    ids, mask, labels = batch
    torch.manual_seed(0)
    base = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          max_position_embeddings=128, final_logit_softcapping=0.5,
                                          bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    model = DyLoRAMoEForCausalLM(base, DyLoRAMoEConfig(dropout=0.0), mature=True)
    randomize_experts(model)
    only = model(input_ids=ids, attention_mask=mask, labels=labels, supervised_logits_only=True)
    full = model(input_ids=ids, attention_mask=mask, labels=labels, supervised_logits_only=False)
    assert model._head_is_logits is False and only.logits is None
    assert full.logits.abs().max() <= 0.5  # capped
    torch.testing.assert_close(only.lm_loss, full.lm_loss, rtol=1e-6, atol=1e-6)


def test_supervised_logits_only_when_the_head_never_sees_the_sequence(batch, monkeypatch):
    """A head that is not called on [B, T, H] (here: the declared head is a module the model never calls) gives
    the usual shifted loss over the returned logits; logits not of the labels' shape raise, naming both shapes."""
    ids, mask, labels = batch
    model = build()
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).lm_loss
    monkeypatch.setattr(model.base_model, "get_output_embeddings", lambda: torch.nn.Identity())
    out = model(input_ids=ids, attention_mask=mask, labels=labels, supervised_logits_only=True)
    assert out.logits is None and torch.allclose(out.lm_loss, reference, atol=1e-6)
    with pytest.raises(ValueError, match=r"logits of shape \(3, 1, 96\) for labels of shape \(3, 12\)"):
        model(input_ids=ids, attention_mask=mask, labels=labels, supervised_logits_only=True, logits_to_keep=1)

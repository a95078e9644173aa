"""Routing decisions, load-balancing losses and statistics."""

import math

import pytest
import torch

from dylora_moe.routing import balance_loss, decide, expert_share, router_entropy, router_z_loss

ALL = torch.ones(4, dtype=torch.bool)


def test_dense_is_temperature_softmax():
    logits = torch.randn(4, 3)
    d = decide(logits, ALL, mode="dense", top_k=1, temperature=2.0)
    assert d.indices is None
    assert torch.allclose(d.probs, torch.softmax(logits / 2.0, -1))
    assert torch.allclose(d.dense_weights(), d.probs)


def test_forced_overrides_mode():
    d = decide(torch.randn(4, 3), ALL, mode="dense", top_k=1, temperature=1.0, forced_expert=2)
    assert d.mode == "forced"
    assert torch.equal(d.dense_weights(), torch.tensor([[0.0, 0, 1]] * 4))


def test_balance_losses_at_uniform_and_collapsed():
    uniform = decide(torch.zeros(4, 4), ALL, mode="sparse", top_k=1, temperature=1.0)
    assert balance_loss(uniform, "seed").item() == pytest.approx(0.0, abs=1e-7)
    # switch: E * sum f_e P_e with P uniform = 1 whatever f is
    assert balance_loss(uniform, "switch").item() == pytest.approx(1.0)
    collapsed_logits = torch.tensor([[20.0, 0, 0, 0]] * 4)
    collapsed = decide(collapsed_logits, ALL, mode="sparse", top_k=1, temperature=1.0)
    assert balance_loss(collapsed, "seed").item() == pytest.approx(0.75, abs=1e-4)  # (1-1/4)^2 + 3/16
    assert balance_loss(collapsed, "switch").item() == pytest.approx(4.0, abs=1e-4)
    assert torch.allclose(expert_share(collapsed), torch.tensor([1.0, 0, 0, 0]))
    assert router_entropy(uniform).item() == pytest.approx(math.log(4))


def test_balance_loss_gradient_pushes_towards_uniform():
    logits = torch.tensor([[2.0, 0, 0, 0]] * 4, requires_grad=True)
    for kind in ("seed", "switch"):
        d = decide(logits, ALL, mode="sparse", top_k=1, temperature=1.0)
        (g,) = torch.autograd.grad(balance_loss(d, kind), logits)
        assert (g[:, 0] > 0).all()  # descending lowers the over-used expert's logit


def test_padding_is_ignored_in_stats():
    logits = torch.tensor([[[5.0, 0], [5.0, 0], [0, 5.0]]])
    mask = torch.tensor([[True, True, False]])
    d = decide(logits, mask, mode="sparse", top_k=1, temperature=1.0)
    assert torch.allclose(expert_share(d), torch.tensor([1.0, 0.0]))


def test_unknown_balance_loss():
    d = decide(torch.zeros(4, 2), ALL, mode="dense", top_k=1, temperature=1.0)
    with pytest.raises(ValueError, match="'seed' or 'switch'"):
        balance_loss(d, "zloss")


@pytest.mark.exact
def test_straight_through_gate_is_one_forward_and_passes_the_probability_gradient():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2]], requires_grad=True)
    mask = torch.ones(2, dtype=torch.bool)
    st = decide(logits, mask, mode="sparse", top_k=1, temperature=1.0, gate="straight_through")
    prob = decide(logits, mask, mode="sparse", top_k=1, temperature=1.0, gate="probability")
    assert torch.equal(st.indices, prob.indices) and torch.equal(st.gates, torch.ones(2, 1))  # exactly 1
    default = decide(logits, mask, mode="sparse", top_k=1, temperature=1.0)  # straight-through since the study
    assert torch.equal(default.gates, st.gates) and default.gates.requires_grad
    assert torch.all(prob.gates < 1)
    upstream = torch.tensor([[0.7], [-1.3]])
    (grad_st,) = torch.autograd.grad((st.gates * upstream).sum(), logits)
    (grad_prob,) = torch.autograd.grad((prob.gates * upstream).sum(), logits)
    # d(p / p.detach()) = dp / p: the probability gate's gradient divided by the gate value
    assert torch.allclose(grad_st, grad_prob / prob.gates.detach(), atol=1e-6)
    assert grad_st.abs().sum() > 0
    with pytest.raises(ValueError, match="gate='half'"):
        decide(logits, mask, mode="sparse", top_k=1, temperature=1.0, gate="half")


@pytest.mark.exact
def test_straight_through_gates_of_top_k_sum_to_one_and_keep_the_router_gradient():
    """With k=2 the chosen experts together weigh exactly what one LoRA does (1), split as their
    renormalised probabilities, and each gate still passes the gradient of its probability."""
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.3, 0.2, -0.4]], requires_grad=True)
    mask = torch.ones(2, dtype=torch.bool)
    st = decide(logits, mask, mode="sparse", top_k=2, temperature=1.0, gate="straight_through")
    prob = decide(logits, mask, mode="sparse", top_k=2, temperature=1.0, gate="probability")
    assert torch.equal(st.indices, prob.indices)
    assert torch.allclose(st.gates.sum(-1), torch.ones(2), atol=1e-6)
    chosen = prob.gates.detach()
    assert torch.allclose(st.gates.detach(), chosen / chosen.sum(-1, keepdim=True), atol=1e-6)
    assert not torch.allclose(st.gates[:, 0], st.gates[:, 1])  # not an even split: the router still ranks them
    upstream = torch.tensor([[0.7, 0.2], [-1.3, 0.4]])
    (grad_st,) = torch.autograd.grad((st.gates * upstream).sum(), logits)
    (grad_prob,) = torch.autograd.grad((prob.gates * upstream).sum(), logits)
    assert torch.allclose(grad_st, grad_prob / chosen.sum(-1, keepdim=True), atol=1e-6)
    assert grad_st.abs().sum() > 0
    assert torch.allclose(st.dense_weights().sum(-1), torch.ones(2), atol=1e-6)  # the dense [B, E] view agrees


def test_router_z_loss_is_the_masked_mean_squared_logsumexp():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [3.0, -1.0, 0.0]], [[0.0, 0.0, 0.0], [9.0, 9.0, 9.0]]],
                          requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    want = sum(torch.logsumexp(logits[b, t], -1) ** 2 for b, t in ((0, 0), (0, 1), (1, 0))) / 3
    got = router_z_loss(logits, mask)
    assert torch.allclose(got, want)
    got.backward()
    assert logits.grad[1, 1].abs().sum() == 0 and logits.grad[0, 0].abs().sum() > 0  # padding gets nothing


def test_dynamic_top_k_keeps_the_experts_needed_to_reach_top_p():
    from dylora_moe.routing import active_experts

    logits = torch.tensor([[8.0, 0.0, 0.0, 0.0],      # peaked: the first expert alone is above 0.9
                           [0.0, 0.0, 0.0, 0.0],      # flat: 0.25 each, three reach 0.75 < 0.9, the cap is 3
                           [2.0, 2.0, -9.0, -9.0]])   # two at ~0.5 each: both are needed
    mask = torch.ones(3, dtype=torch.bool)
    d = decide(logits.requires_grad_(), mask, mode="sparse", top_k=3, temperature=1.0, top_p=0.9)
    indices, gates = d.selected()
    assert indices.shape == (3, 3)  # static shape: the unused slots weigh 0
    assert (gates > 0).sum(-1).tolist() == [1, 3, 2]
    torch.testing.assert_close(gates.sum(-1), torch.ones(3))  # straight-through: renormalised over the kept
    assert active_experts(d).item() == pytest.approx(2.0)
    gates.sum().backward()  # the router still learns through the kept gates
    assert logits.grad is not None
    fixed = decide(logits.detach(), mask, mode="sparse", top_k=3, temperature=1.0)
    assert (fixed.selected()[1] > 0).sum().item() == 9 and active_experts(fixed).item() == 3.0


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_a_model_with_dynamic_top_k_trains(routing, batch):
    from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
    from tests.tiny import make_base, randomize_experts

    ids, mask, labels = batch
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=4, top_k=3, top_p=0.5,
                                                                      routing=routing), mature=True)
    randomize_experts(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and any(p.grad is not None for p in model.router_parameters())
    with pytest.raises(Exception, match="top_p"):
        DyLoRAMoEConfig(top_p=1.5)

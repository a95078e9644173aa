"""The domain routing loss (``moe.domain_mi_coef``): the mutual information between a sequence's domain and the
router's choice, its value on known routings, its gradient, and that maximising it makes routing follow domains;
the running estimator (``moe.domain_mi_decay``): pointwise mutual information, the gain that follows the stream's
gradient, the model's tables and masses, and that it separates domains where a micro-batch holds one sequence."""

import math

import pytest
import torch

from dylora_moe import ConfigError, DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.domain_routing import (
    domain_indicator,
    domain_mutual_information,
    domain_pmi_gain,
    mutual_information,
    pointwise_mutual_information,
)
from dylora_moe.evaluation.analysis import normalized_mutual_information
from dylora_moe.routing import decide
from dylora_moe.training.domain_stats import RunningDomainRouting
from tests.tiny import make_base


def _dense(probs, mask=None):
    logits = probs.clamp_min(1e-30).log()
    return decide(logits, torch.ones(probs.shape[:-1], dtype=torch.bool) if mask is None else mask,
                  mode="dense", top_k=1, temperature=1.0)


def test_mutual_information_of_known_routings():
    ids = torch.tensor([3, 3, 7, 7])  # two domains with arbitrary ids
    own = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0]])
    assert domain_mutual_information(_dense(own), domain_indicator(ids)).item() == pytest.approx(math.log(2), abs=1e-5)
    alike = torch.tensor([[0.5, 0.3, 0.2]] * 4)  # routing does not depend on the domain
    assert domain_mutual_information(_dense(alike), domain_indicator(ids)).item() == pytest.approx(0.0, abs=1e-6)
    one_domain = torch.tensor([5, 5, 5, 5])
    assert domain_mutual_information(_dense(own), domain_indicator(one_domain)).item() == pytest.approx(0.0, abs=1e-6)
    # three domains on two experts: I = H(E) = ln 2 when domains 0, 1 share expert 0 and domain 2 has expert 1
    shared = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0]])
    three = domain_indicator(torch.tensor([0, 1, 2, 2]))
    assert domain_mutual_information(_dense(shared), three).item() == pytest.approx(math.log(2), abs=1e-5)


def test_token_routing_counts_valid_tokens_only():
    ids = domain_indicator(torch.tensor([0, 1]))
    probs = torch.tensor([[[1.0, 0], [1.0, 0], [0, 1.0]],     # domain 0: two tokens on expert 0, a pad on 1
                          [[0, 1.0], [0, 1.0], [1.0, 0]]])    # domain 1: two tokens on expert 1, a pad on 0
    mask = torch.tensor([[True, True, False], [True, True, False]])
    assert domain_mutual_information(_dense(probs, mask), ids).item() == pytest.approx(math.log(2), abs=1e-5)
    everything = domain_mutual_information(_dense(probs, torch.ones(2, 3, dtype=torch.bool)), ids).item()
    assert 0 < everything < math.log(2) - 0.1  # the pads, counted, would blur it
    with pytest.raises(ValueError, match="one one-hot row per sequence"):
        domain_mutual_information(_dense(probs, mask), domain_indicator(torch.tensor([0, 1, 1])))
    with pytest.raises(ValueError, match="one domain per sequence"):
        domain_indicator(torch.tensor([[0, 1]]))


def _model(coef, routing="token"):
    config = DyLoRAMoEConfig(num_experts=2, r=4, alpha=8, routing=routing, domain_mi_coef=coef, dropout=0.0)
    return DyLoRAMoEForCausalLM(make_base("llama"), config, mature=True).train()


def _batch():
    gen = torch.Generator().manual_seed(0)
    # domain 0 writes tokens 10-39, domain 1 tokens 50-79: their inputs differ, so a router can tell them apart
    ids = torch.cat([torch.randint(10, 40, (4, 12), generator=gen), torch.randint(50, 80, (4, 12), generator=gen)])
    return ids, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


@pytest.mark.parametrize("routing", ["token", "sequence"])
def test_the_loss_enters_the_total_and_its_gradient_reaches_the_routers(routing):
    model = _model(0.5, routing)
    ids, domains = _batch()
    out = model(input_ids=ids, labels=ids, domain_ids=domains)
    assert out.domain_mi is not None and out.domain_mi.item() >= 0
    want = out.lm_loss + model.moe_config.balance_coef * out.aux_loss - 0.5 * out.domain_mi
    torch.testing.assert_close(out.loss, want)
    model.zero_grad()
    out.domain_mi.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.routers.parameters() if p.requires_grad)
    # no domains, or a zero coefficient: no term
    assert model(input_ids=ids, labels=ids).domain_mi is None
    assert _model(0.0, routing)(input_ids=ids, labels=ids, domain_ids=domains).domain_mi is None


def test_maximising_it_sends_each_domain_to_an_expert_of_its_own():
    model = _model(1.0)
    ids, domains = _batch()
    optimizer = torch.optim.Adam(model.routers.parameters(), lr=0.05)

    def per_example_nmi():
        with torch.no_grad():
            choice = model(input_ids=ids, domain_ids=domains).expert_choice
        return normalized_mutual_information(domains.tolist(), choice.tolist())

    first = model(input_ids=ids, labels=ids, domain_ids=domains).domain_mi.item()
    for _ in range(40):
        optimizer.zero_grad()
        (-model(input_ids=ids, labels=ids, domain_ids=domains).domain_mi).backward()
        optimizer.step()
    last = model(input_ids=ids, labels=ids, domain_ids=domains).domain_mi.item()
    assert last > first + 0.2 and last > 0.5 * math.log(2)
    assert per_example_nmi() == pytest.approx(1.0)


def test_a_negative_coefficient_is_refused():
    with pytest.raises(ConfigError, match="domain_mi_coef"):
        DyLoRAMoEConfig(domain_mi_coef=-0.1)


# --- the running estimator (moe.domain_mi_decay > 0): pointwise mutual information of running statistics ---


def test_pointwise_mutual_information_on_known_joints():
    # domain 0 only on expert 0, domain 1 half and half: PMI(0,0) = log(2/3 / ((1/2)(3/4))) etc., unsmoothed
    joint = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    pmi = pointwise_mutual_information(joint, smoothing=0.0)
    assert pmi[0, 0].item() == pytest.approx(math.log((2 / 4) / ((2 / 4) * (3 / 4))), abs=1e-5)
    assert pmi[1, 1].item() == pytest.approx(math.log((1 / 4) / ((2 / 4) * (1 / 4))), abs=1e-5)
    assert pmi[0, 1].item() < -20  # never seen, unsmoothed: very negative, finite
    smoothed = pointwise_mutual_information(joint)  # the default smoothing keeps it moderate
    assert -6 < smoothed[0, 1].item() < -3 and torch.isfinite(smoothed).all()
    # a domain never seen (zero row) and an empty joint: 0 everywhere, no NaN
    unseen = pointwise_mutual_information(torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(unseen[1], torch.zeros(2))
    assert torch.equal(pointwise_mutual_information(torch.zeros(3, 2, 4)), torch.zeros(3, 2, 4))
    # independence: PMI 0 everywhere, and I(D; E) = 0; a batch of tables at once
    both = torch.stack([torch.tensor([[1.0, 3.0], [2.0, 6.0]]), joint])
    torch.testing.assert_close(pointwise_mutual_information(both, smoothing=0.0)[0], torch.zeros(2, 2),
                               atol=1e-6, rtol=0)
    assert mutual_information(both)[0].item() == pytest.approx(0.0, abs=1e-6) and mutual_information(both)[1] > 0


def test_the_gain_follows_the_gradient_of_the_mutual_information_of_the_whole_stream():
    # dI/dJ(d, e) = (PMI(d, e) - I) / sum(J): moving one unit's probability between experts (the -I cancels, its
    # probabilities sum to 1) changes the stream's I(D; E) as the gain's gradient says
    joint = torch.tensor([[5.0, 1.0, 2.0], [1.0, 4.0, 1.0]], requires_grad=True)
    mi = mutual_information(joint)
    (grad,) = torch.autograd.grad(mi, joint)
    pmi = pointwise_mutual_information(joint.detach(), smoothing=0.0)
    torch.testing.assert_close(grad, (pmi - mi.detach()) / joint.detach().sum())
    # the gain of one decision: sum_u sum_e p_u(e) PMI(d_u, e) / N, pads left out
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]],
                          [[0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]]])
    mask = torch.tensor([[True, True], [True, False]])
    decision = _dense(probs, mask)
    ids = torch.tensor([0, 1])
    want = (probs[0, 0] @ pmi[0] + probs[0, 1] @ pmi[0] + probs[1, 0] @ pmi[1]) / 3
    assert domain_pmi_gain(decision, ids, pmi).item() == pytest.approx(want.item(), abs=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        domain_pmi_gain(decision, torch.tensor([0, 2]), pmi)
    with pytest.raises(ValueError, match="one domain per sequence"):
        domain_pmi_gain(decision, torch.tensor([0, 1, 1]), pmi)


@pytest.mark.parametrize("routing", ["token", "sequence"])
def test_the_model_takes_a_table_per_decision_and_returns_the_mass(routing):
    model = _model(0.5, routing)
    ids, domains = _batch()
    decisions = len(model.router_slots)
    zero = torch.zeros(decisions, 2, 2)
    out = model(input_ids=ids, labels=ids, domain_ids=domains, domain_pmi=zero)
    # zero tables: no gain and no gradient, the loss is the LM's and the balance loss's
    assert out.domain_mi.item() == 0.0
    torch.testing.assert_close(out.loss, out.lm_loss + model.moe_config.balance_coef * out.aux_loss)
    # the mass: per decision and sequence, the router's probabilities summed over the sequence's tokens
    units = 12 if routing == "token" else 1
    assert out.domain_mass.shape == (decisions, 8, 2) and not out.domain_mass.requires_grad
    torch.testing.assert_close(out.domain_mass.sum(-1), torch.full((decisions, 8), float(units)))
    # a table that favours expert 0 for domain 0 and expert 1 for domain 1: the term is the gain, and it enters
    table = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).expand(decisions, 2, 2)
    out = model(input_ids=ids, labels=ids, domain_ids=domains, domain_pmi=table)
    want = out.lm_loss + model.moe_config.balance_coef * out.aux_loss - 0.5 * out.domain_mi
    torch.testing.assert_close(out.loss, want)
    model.zero_grad()
    out.domain_mi.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.routers.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="one \\[domains, experts\\] table per routing decision"):
        model(input_ids=ids, labels=ids, domain_ids=domains, domain_pmi=torch.zeros(decisions + 1, 2, 2))


def test_running_statistics_separate_domains_where_each_micro_batch_holds_one_sequence():
    """A micro-batch of one sequence has one domain: its own mutual information is 0 and teaches nothing. The
    running statistics see both domains over the steps, and following them sends each domain to its own expert."""
    ids, domains = _batch()
    model = _model(1.0)

    def per_example_nmi():
        with torch.no_grad():
            choice = model(input_ids=ids, domain_ids=domains).expert_choice
        return normalized_mutual_information(domains.tolist(), choice.tolist())

    assert model(input_ids=ids[:1], labels=ids[:1], domain_ids=domains[:1]).domain_mi.item() == 0.0
    assert per_example_nmi() < 0.9  # the inputs differ, so routing already leans a little
    optimizer = torch.optim.Adam(model.routers.parameters(), lr=0.05)
    stats = RunningDomainRouting(num_domains=2, decay=0.9, decisions=len(model.router_slots), experts=2)
    for _ in range(12):
        for i in [0, 4, 1, 5, 2, 6, 3, 7]:  # one optimizer step per sequence, the domains alternating
            optimizer.zero_grad()
            out = model(input_ids=ids[i:i + 1], labels=ids[i:i + 1], domain_ids=domains[i:i + 1],
                        domain_pmi=stats.pmi("cpu"))
            (-out.domain_mi).backward()
            optimizer.step()
            stats.add(out.domain_mass, domains[i:i + 1])
            stats.end_step()
    assert per_example_nmi() == pytest.approx(1.0)
    assert stats.mutual_information() > 0.5 * math.log(2)


def test_the_decay_is_checked():
    assert DyLoRAMoEConfig(domain_mi_decay=0.9).domain_mi_decay == 0.9
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="domain_mi_decay"):
            DyLoRAMoEConfig(domain_mi_decay=bad)

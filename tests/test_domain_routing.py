"""The domain routing loss (``moe.domain_mi_coef``): the mutual information between a sequence's domain and the
router's choice, its value on known routings, its gradient, and that maximising it makes routing follow domains."""

import math

import pytest
import torch

from dylora_moe import ConfigError, DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.evaluation.analysis import normalized_mutual_information
from dylora_moe.routing import decide, domain_indicator, domain_mutual_information
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

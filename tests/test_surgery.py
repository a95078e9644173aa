"""Expert-pool surgery (dylora_moe.surgery): removing and merging experts, TIES, update similarity."""

from __future__ import annotations

import pytest
import torch

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.surgery import merge_experts, remove_experts, ties_merge, update_similarity_matrix
from tests.tiny import make_base, randomize_experts


def pool(routing="sequence", **cfg):
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=4, r=4, alpha=8, dropout=0.0,
                                                                      routing=routing, **cfg), mature=True)
    randomize_experts(model)
    with torch.no_grad():
        for p in model.router_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def forced(model, ids, mask, e):
    return model(input_ids=ids, attention_mask=mask, forced_expert=e).logits


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_removing_experts_keeps_the_others_and_their_router_logits(batch, routing, tmp_path):
    ids, mask, _ = batch
    model = pool(routing)
    before = {e: forced(model, ids, mask, e) for e in range(4)}
    features = torch.randn(3, model.routers[0].in_features)
    logits = [router(features) for router in model.routers]
    assert remove_experts(model, [1, 3]) == [0, 2]
    assert model.num_experts == 2 and model.moe_config.num_experts == 2 and len(model.maturity) == 2
    for new, old in enumerate([0, 2]):  # the same expert (kernels over fewer experts may sum in another order)
        torch.testing.assert_close(forced(model, ids, mask, new), before[old], rtol=1e-5, atol=1e-5)
    for router, old in zip(model.routers, logits):  # the same rows: equal up to the BLAS order of a smaller matmul
        torch.testing.assert_close(router(features), old[:, [0, 2]], rtol=1e-6, atol=1e-6)
    model(input_ids=ids, attention_mask=mask)  # routed as usual over what is left
    model.save_pretrained(tmp_path / "ckpt")
    loaded = DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=make_base("llama"))
    assert loaded.num_experts == 2
    torch.testing.assert_close(forced(loaded, ids, mask, 1), before[2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="last expert"):
        remove_experts(model, [0, 1])
    with pytest.raises(ValueError, match=r"must be in 0..1"):
        remove_experts(model, [5])


def test_merging_two_copies_gives_the_same_expert_and_the_summed_router_probability(batch):
    ids, mask, _ = batch
    model = pool()
    with torch.no_grad():
        for layer in model.expert_layers:
            layer.lora_A[2].copy_(layer.lora_A[0])
            layer.lora_B[2].copy_(layer.lora_B[0])
        for router in model.routers:
            router.weight[2].copy_(router.weight[0])
    want = forced(model, ids, mask, 0)
    biases = [router.bias[[0, 2]].clone() for router in model.routers]
    for method in ("average", "ties"):
        merged_model = pool()
        merged_model.load_state_dict(model.state_dict())
        index = merge_experts(merged_model, [0, 2], method=method, weights=[3, 1], density=1.0)
        assert index == 0 and merged_model.num_experts == 3
        torch.testing.assert_close(forced(merged_model, ids, mask, index), want, rtol=1e-4, atol=1e-4)
        for router, bias in zip(merged_model.routers, biases):
            assert router.bias[0].item() == pytest.approx(torch.logsumexp(bias, 0).item())
    with pytest.raises(ValueError, match="two experts or more"):
        merge_experts(model, [1])
    with pytest.raises(ValueError, match="method='magic'"):
        merge_experts(model, [0, 1], method="magic")


def test_ties_trims_elects_the_sign_and_averages_the_agreeing_entries():
    a = torch.tensor([[4.0, -1.0, 0.5, 2.0]])
    b = torch.tensor([[2.0, 3.0, -0.2, -6.0]])
    # density 0.5: a keeps 4 and 2, b keeps 3 and -6; signs: +, +, 0, -(2-6<0)
    merged = ties_merge([a, b], [0.5, 0.5], density=0.5)
    assert torch.allclose(merged, torch.tensor([[4.0, 3.0, 0.0, -6.0]]))
    with pytest.raises(ValueError, match="density"):
        ties_merge([a], [1.0], density=0.0)


def test_update_similarity_is_one_for_copies_and_the_diagonal():
    model = pool()
    with torch.no_grad():
        for layer in model.expert_layers:
            layer.lora_B[3].copy_(layer.lora_B[1] * 2)  # the same direction, twice as large
            layer.lora_A[3].copy_(layer.lora_A[1])
    sim = update_similarity_matrix(model)
    assert sim.shape == (4, 4) and torch.allclose(sim.diagonal(), torch.ones(4))
    assert sim[1, 3].item() == pytest.approx(1.0, abs=1e-5) and sim[0, 1].abs().item() < 0.9

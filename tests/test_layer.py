"""MoELoRALayer's options: asymmetric experts (shared A), GOAT's scale, SVD-segment initialisation."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel

from dylora_moe import ConfigError, DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from tests.tiny import make_base, randomize_experts


def model_for(arch: str = "llama", mature: bool = True, **cfg) -> DyLoRAMoEForCausalLM:
    config = DyLoRAMoEConfig(**{"num_experts": 3, "r": 4, "alpha": 8, "dropout": 0.0, **cfg})
    return DyLoRAMoEForCausalLM(make_base(arch), config, mature=mature)


# ----------------------------------------------------------------------------- shared A (HydraLoRA)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_a_holds_one_a_per_module_and_one_b_head_per_expert(arch):
    model = model_for(arch, shared_a=True, target_modules="all-linear")
    expected = sum(layer.ranks[0] * layer.in_features + 3 * layer.ranks[0] * layer.out_features
                   for layer in model.expert_layers)
    assert sum(p.numel() for p in model.expert_parameters()) == expected
    for layer in model.expert_layers:
        assert len(layer.lora_A) == 1 and len(layer.lora_B) == 3
        assert all(a is layer.lora_A[0] for a in layer.a_list())
    report = model.parameter_report()
    assert report.lora_params == expected
    shared = sum(layer.lora_A[0].numel() for layer in model.expert_layers)
    assert report.shared_expert_params == shared and "shared by every expert" in str(report)
    # an expert's own parameters are its B heads
    assert {id(p) for p in model.expert_parameters(1)} == {id(layer.lora_B[1]) for layer in model.expert_layers}


@pytest.mark.parametrize("routing", ["sequence", "token"])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_shared_a_computes_what_independent_experts_with_equal_a_compute(batch, routing, mode):
    ids, mask, labels = batch
    shared = model_for(shared_a=True, routing=routing, routing_mode=mode)
    plain = model_for(shared_a=False, routing=routing, routing_mode=mode)
    randomize_experts(shared)
    plain.load_state_dict(shared.state_dict(), strict=False)  # routers, B heads and lora_A.0
    with torch.no_grad():
        for s_layer, p_layer in zip(shared.expert_layers, plain.expert_layers):
            for a in p_layer.lora_A:
                a.copy_(s_layer.lora_A[0])
    out_s = shared(input_ids=ids, attention_mask=mask, labels=labels, supervised_logits_only=False)
    out_p = plain(input_ids=ids, attention_mask=mask, labels=labels, supervised_logits_only=False)
    assert torch.allclose(out_s.logits, out_p.logits, atol=1e-5)
    out_s.loss.backward()
    out_p.loss.backward()
    for s_layer, p_layer in zip(shared.expert_layers, plain.expert_layers):
        # the shared A's gradient is the sum of what each expert's own copy would get
        summed = sum(a.grad for a in p_layer.lora_A if a.grad is not None)
        assert torch.allclose(s_layer.lora_A[0].grad, summed, atol=1e-5)
        for bs, bp in zip(s_layer.lora_B, p_layer.lora_B):
            assert (bs.grad is None) == (bp.grad is None)
            if bs.grad is not None:
                assert torch.allclose(bs.grad, bp.grad, atol=1e-5)


def test_shared_a_growth_round_trip_and_export(tmp_path, batch):
    ids, mask, _ = batch
    model = model_for(shared_a=True)
    randomize_experts(model)
    with pytest.raises(ValueError, match="shared A's rank 4"):
        model.add_expert(rank=8)
    assert model.num_experts == 3  # a refused growth changes nothing
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, forced_expert=1).logits
    model.add_expert()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask, forced_expert=1).logits, before)
    model.set_all_mature()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=make_base("llama"))
    assert loaded.moe_config.shared_a and loaded.num_experts == 4
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    peft = PeftModel.from_pretrained(make_base("llama"), str(model.export_expert(1, tmp_path / "e1"))).eval()
    assert torch.allclose(peft(input_ids=ids, attention_mask=mask).logits, before, atol=1e-5)


# ----------------------------------------------------------------------------- GOAT's scale
def test_goat_scale_is_sqrt_3_d_in_over_r_and_scales_the_update(batch):
    ids, mask, _ = batch
    goat = model_for(scaling="goat")
    plain = model_for()
    randomize_experts(goat)
    randomize_experts(plain)
    layer = goat.expert_layers[0]
    assert layer.scale_of(0) == pytest.approx(math.sqrt(3 * layer.in_features / 4))
    assert plain.expert_layers[0].scale_of(0) == pytest.approx(8 / 4)
    # the same weights with B divided by the ratio of the scales give the same outputs
    with torch.no_grad():
        for g_layer, p_layer in zip(goat.expert_layers, plain.expert_layers):
            for e, b in enumerate(g_layer.lora_B):
                b.copy_(p_layer.lora_B[e] * p_layer.scale_of(e) / g_layer.scale_of(e))
        want = plain(input_ids=ids, attention_mask=mask, forced_expert=2).logits
        assert torch.allclose(goat(input_ids=ids, attention_mask=mask, forced_expert=2).logits, want, atol=1e-5)


# ----------------------------------------------------------------------------- SVD-segment initialisation (GOAT)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_svd_init_gives_distinct_experts_and_subtracts_them_as_a_residual(arch, batch):
    ids, mask, _ = batch
    model = model_for(arch, expert_init="svd", svd_rho=10.0)
    base = make_base(arch)
    for layer in model.expert_layers:
        weight = layer.base_layer.weight.detach()
        w = weight.t() if layer.is_conv1d else weight
        singular = torch.linalg.svdvals(w)
        segment = singular.numel() // 3
        for e in range(3):
            delta = layer.scale_of(e) * layer.lora_B[e] @ layer.lora_A[e]
            # expert e holds singular values e*segment .. e*segment+r, divided by rho
            got = torch.linalg.svdvals(delta)[:4]
            assert torch.allclose(got, singular[e * segment:e * segment + 4] / 10.0, rtol=1e-3, atol=1e-6)
        # distinct singular directions: the experts' A rows are orthogonal to each other's
        assert float((layer.lora_A[0] @ layer.lora_A[1].t()).detach().abs().max()) < 1e-4
        total = sum(layer.scale_of(e) * layer.lora_B[e] @ layer.lora_A[e] for e in range(3))
        assert torch.allclose(layer.residual_weight(), total, atol=1e-5)
    with torch.no_grad():
        with model.disable_adapters():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                               base(input_ids=ids, attention_mask=mask).logits)
        # top-1: the unchosen experts' segments (a tenth of their singular values) are left out of the weight
        routed = model(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(routed, base(input_ids=ids, attention_mask=mask).logits, atol=1e-6)


def test_svd_init_round_trip_export_and_merge(tmp_path, batch):
    ids, mask, _ = batch
    model = model_for(expert_init="svd")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, forced_expert=1).logits
    model.save_pretrained(tmp_path / "ckpt")
    loaded = DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=make_base("llama"))
    for a, b in zip(model.expert_layers, loaded.expert_layers):
        assert torch.equal(a.lora_residual_A, b.lora_residual_A) and torch.equal(a.lora_residual_B, b.lora_residual_B)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask, forced_expert=1).logits, want)
        merged = model.merge_expert(1)
        assert torch.allclose(merged(input_ids=ids, attention_mask=mask).logits, want, atol=1e-5)
    peft = PeftModel.from_pretrained(make_base("llama"), str(model.export_expert(1, tmp_path / "e1"))).eval()
    assert peft.peft_config["default"].r == 4 + 3 * 4  # the expert's rank plus the residual's
    assert torch.allclose(peft(input_ids=ids, attention_mask=mask).logits, want, atol=1e-5)


def test_svd_init_checks_its_settings():
    with pytest.raises(ConfigError, match="does not go with shared_a"):
        DyLoRAMoEConfig(expert_init="svd", shared_a=True)
    with pytest.raises(ConfigError, match="svd_rho"):
        DyLoRAMoEConfig(svd_rho=0.0)
    with pytest.raises(ValueError, match="larger than the 21 singular values per expert"):
        model_for(expert_init="svd", r=32)  # 64-wide weights, 3 experts: 21 singular values each


# ----------------------------------------------------------------------------- layer-wise allocation (MoLA)
def test_layer_experts_put_more_experts_in_upper_blocks(batch):
    ids, mask, labels = batch
    model = model_for(num_experts=3, layer_experts="increasing")
    assert model.block_experts == {0: 1, 1: 3}  # a third of 3 in the first block, 3 in the last
    assert [layer.num_experts for layer in model.expert_layers] == [1] * 4 + [3] * 4
    assert [r.weight.shape[0] for r in model.routers] == [1, 3]
    randomize_experts(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.expert_share.shape == (3,) and out.router_probs.shape == (3, 3)
    assert torch.isclose(out.expert_share.sum(), torch.tensor(1.0))
    out.loss.backward()
    assert all(layer.lora_B[e].grad is not None for layer in model.expert_layers for e in range(layer.num_experts))
    # expert 2 lives in the upper block only: forcing it leaves the lower block to the base weights
    with torch.no_grad():
        forced = model(input_ids=ids, attention_mask=mask, forced_expert=2).logits
        merged = model.merge_expert(2)(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(forced, merged, atol=1e-5)
    upper = [layer for layer in model.expert_layers if layer.layer_index == 1]
    assert sum(p.numel() for p in model.expert_parameters(2)) == sum(4 * (la.in_features + la.out_features)
                                                                      for la in upper)
    with pytest.raises(ValueError, match="does not grow"):
        model.add_expert()
    with pytest.raises(ValueError, match="block 0 holds 1 experts"):
        model(input_ids=ids, attention_mask=mask, forced_expert=torch.tensor([0, 1, 2]))


def test_layer_experts_round_trip_and_checks(tmp_path, batch):
    ids, mask, _ = batch
    model = model_for(num_experts=4, layer_experts=[4, 2])
    randomize_experts(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=make_base("llama"))
    assert loaded.block_experts == {0: 4, 1: 2}
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)
    with pytest.raises(ConfigError, match="needs routing='token'"):
        DyLoRAMoEConfig(layer_experts="increasing", routing="sequence")
    with pytest.raises(ConfigError, match="the largest equal to num_experts=4"):
        DyLoRAMoEConfig(layer_experts=[2, 3])
    with pytest.raises(ConfigError, match="3 counts for 2 adapted"):
        model_for(num_experts=4, layer_experts=[4, 2, 2])
    with pytest.raises(ConfigError, match="top_k"):
        DyLoRAMoEConfig(num_experts=4, layer_experts=[4, 1], top_k=2)

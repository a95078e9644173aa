"""The parameter report counts what trains and confirms the shared base."""

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from tests.tiny import make_base


def test_report_counts():
    base = make_base("llama")
    base_params = sum(p.numel() for p in base.parameters())
    model = DyLoRAMoEForCausalLM(base, DyLoRAMoEConfig(num_experts=3, r=4, target_modules=["q_proj"],
                                                       routing="sequence"))
    token = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=3, r=4, target_modules=["q_proj"]))
    assert token.parameter_report().router_params == 2 * (3 * 64 + 3)  # token routing (default): one per block
    report = model.parameter_report()
    # q_proj is 64 -> 64: A 4x64 + B 64x4 per expert per layer, 2 layers
    assert report.params_per_expert == [2 * (4 * 64 + 64 * 4)] * 3
    assert report.lora_params == 3 * 1024
    assert report.router_params == 3 * 64 + 3
    assert report.frozen_params == base_params
    assert report.trainable_params + report.frozen_params == report.total_params
    assert report.shared_base
    text = str(report)
    assert "Verifying trainable parameters" in text and "Memory Efficiency Verification" in text
    assert "share one frozen base model: yes" in text
    model.add_expert(rank=8)
    assert model.parameter_report().params_per_expert[-1] == 2 * (8 * 64 + 64 * 8)

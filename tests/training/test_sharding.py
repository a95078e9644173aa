"""The pieces of sharded training that run in one process: which experts a step uses (the rule that keeps sparse
routing exact under FSDP), and the torch.distributed.checkpoint round trip of adapter and optimizer state,
including parameters that have no optimizer state yet."""

from __future__ import annotations

import pytest
import torch

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.training.sharding import ExpertUsage, load_sharded, save_sharded
from tests.tiny import make_base


def tiny(routing: str, num_experts: int = 4) -> DyLoRAMoEForCausalLM:
    torch.manual_seed(0)
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=num_experts, r=4, alpha=8,
                                                                     dropout=0.0, routing=routing), mature=True)
    for layer in model.expert_layers:  # B != 0 so that every used expert gets a non-zero gradient
        for b in layer.lora_B:
            torch.nn.init.normal_(b.data, std=0.02)
    return model.train()


def with_grad(layer, e: int) -> bool:
    return layer.lora_B[e].grad is not None


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_usage_is_exactly_the_experts_that_receive_a_gradient(routing):
    model = tiny(routing)
    usage = ExpertUsage(model)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    for layer, used in zip(model.expert_layers, usage.used, strict=True):
        assert [with_grad(layer, e) for e in range(layer.num_experts)] == used.tolist()
    if routing == "sequence":  # two sequences, four experts: at least two have no gradient
        assert set(out.expert_choice.tolist()) == {e for e in range(4) if usage.used[0][e]}
        unused = usage.drop_unused_gradients(torch.device("cpu"))
        assert unused == sum(4 - len(set(out.expert_choice.tolist())) for _ in model.expert_layers) > 0
    else:
        assert all(bool(u.all()) for u in usage.used)
        assert usage.drop_unused_gradients(torch.device("cpu")) == 0
    assert not any(bool(u.any()) for u in usage.used)  # recording starts afresh for the next step
    with torch.no_grad():  # evaluation forwards are not recorded
        model(input_ids=ids)
    assert not any(bool(u.any()) for u in usage.used)
    usage.remove()


def test_sharded_state_round_trip_keeps_missing_optimizer_states_missing(tmp_path):
    model = tiny("sequence")
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert 0 < len(optimizer.state) < len(model.trainable_parameters())  # one sequence: unchosen experts unset
    save_sharded(tmp_path / "sharded", model, optimizer)
    assert (tmp_path / "sharded" / ".metadata").is_file()

    other = tiny("sequence")
    other_opt = torch.optim.AdamW(other.trainable_parameters(), lr=5e-1)
    load_sharded(tmp_path / "sharded", other, other_opt)
    names = dict(zip(map(id, model.trainable_parameters()), range(len(model.trainable_parameters())), strict=True))
    for p, q in zip(model.trainable_parameters(), other.trainable_parameters(), strict=True):
        assert torch.equal(p, q)
        assert (p in optimizer.state) == (q in other_opt.state), names[id(p)]
        if p in optimizer.state:
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(optimizer.state[p][key], other_opt.state[q][key])
    assert other_opt.param_groups[0]["lr"] == 1e-2  # the saved hyper-parameters came back too
    # the router's feature statistics (buffers) travel with the adapter
    for (n, a), (_, b) in zip(model.routers.named_buffers(), other.routers.named_buffers(), strict=True):
        assert torch.equal(a, b), n

"""Dynamic top-k with a learned threshold: the straight-through keep mask, the slots training computes, the compute
penalty, the routers' threshold parameters, checkpoints and the trainer's learning rate for them."""

import pytest
import torch

from dylora_moe import ConfigError, DyLoRAMoEConfig, DyLoRAMoEForCausalLM, routing
from dylora_moe.experts import mixture_delta
from dylora_moe.routing import THRESHOLD_BAND, active_experts, decide, expert_share, fixed_k
from tests.tiny import make_base, randomize_experts

MASK = torch.ones(3, dtype=torch.bool)
# probabilities (softmax of these logits): row 0 one expert above 0.6; row 1 two needed; row 2 the second slot's
# "before" (0.68) just above the threshold 0.6, inside the band
LOGITS = torch.log(torch.tensor([[0.70, 0.20, 0.05, 0.05],
                                 [0.40, 0.35, 0.15, 0.10],
                                 [0.68, 0.30, 0.01, 0.01]]))


def sparse(logits, **kw):
    return decide(logits, kw.pop("mask", MASK), mode="sparse", top_k=kw.pop("top_k", 2), temperature=1.0, **kw)


def test_a_learned_threshold_routes_forward_as_the_same_fixed_top_p():
    tau = torch.tensor(0.6, requires_grad=True)
    learned, fixed = sparse(LOGITS, threshold=tau), sparse(LOGITS, top_p=0.6)
    assert torch.equal(learned.gates, fixed.gates) and torch.equal(learned.indices, fixed.indices)
    assert (learned.gates != 0).sum(-1).tolist() == [1, 2, 1]  # only row 1's first expert (0.40) is below 0.6
    assert active_experts(learned).item() == pytest.approx(4 / 3)
    # a fixed k is known from shapes; a dynamic one is counted
    assert fixed_k(learned) is None and fixed_k(fixed) is None and fixed_k(sparse(LOGITS)) == 2
    assert active_experts(sparse(LOGITS)).item() == 2.0


def test_the_threshold_learns_from_the_expert_at_the_margin_and_the_penalty_pulls_it_down():
    """d loss / d tau says whether the slot at the threshold helps: negative when the dropped second expert would
    lower the loss (descent raises tau), positive when it would raise it; the soft count only rises with tau."""
    for value, sign in ((-1.0, -1.0), (1.0, 1.0)):
        tau = torch.tensor(0.6, requires_grad=True)
        d = sparse(LOGITS, threshold=tau)
        # a loss where each kept expert adds its gate times a value: the first slot 0, the second `value`
        loss = (d.gates[..., 1] * value).sum()
        loss.backward()
        assert torch.sign(tau.grad).item() == sign
    tau = torch.tensor(0.6, requires_grad=True)
    d = sparse(LOGITS, threshold=tau)
    assert 1.0 < d.soft_k.item() < 2.0
    d.soft_k.backward()
    assert tau.grad.item() > 0  # more threshold, more experts: the penalty's descent lowers it


def test_training_computes_the_dropped_slots_near_the_threshold_and_no_others():
    tau = torch.tensor(0.6)
    d = sparse(LOGITS, threshold=tau)
    before = torch.tensor([[0.0, 0.70], [0.0, 0.40], [0.0, 0.68]])
    assert torch.equal(d.computed, before < 0.6 + THRESHOLD_BAND)
    assert d.computed.tolist() == [[True, True], [True, True], [True, True]]  # 0.70 and 0.68 are within the band
    far = sparse(torch.log(torch.tensor([[0.98, 0.01, 0.005, 0.005]])), threshold=tau, mask=MASK[:1])
    assert far.computed.tolist() == [[True, False]] and far.gates[0, 1] == 0


def test_expert_share_counts_only_the_experts_a_unit_kept():
    d = sparse(LOGITS, top_p=0.6)
    share = expert_share(d)
    kept = (d.gates != 0).float()
    want = torch.zeros(4)
    assert kept.sum(-1).tolist() == [1, 2, 1]
    for row in range(3):
        for slot in range(2):
            want[d.indices[row, slot]] += kept[row, slot] / kept[row].sum() / 3
    torch.testing.assert_close(share, want)
    torch.testing.assert_close(share.sum(), torch.tensor(1.0))


D_IN, D_OUT = 7, 5


def _kernel_case(tau):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, D_IN, generator=gen, dtype=torch.float64)
    logits = torch.randn(2, 8, 4, generator=gen, dtype=torch.float64) * 2
    a = [torch.randn(3, D_IN, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    b = [torch.randn(D_OUT, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    decision = decide(logits, torch.ones(2, 8, dtype=torch.bool), mode="sparse", top_k=2, temperature=1.0,
                      threshold=tau)
    return x, decision, a, b, torch.tensor([2.0, 1.0, 0.5, 1.5], dtype=torch.float64)


def _threshold_grad(tau_value, dense):
    tau = torch.tensor(tau_value, dtype=torch.float64, requires_grad=True)
    x, decision, a, b, scale = _kernel_case(tau)
    if dense:  # every expert computed for every token: the reference
        w = decision.dense_weights() * scale
        out = sum(w[..., e:e + 1] * ((x @ a[e].t()) @ b[e].t()) for e in range(4))
    else:  # the CPU training kernel (segmented), which computes the slots of decision.computed
        out = mixture_delta(x, decision, a, b, scale)
    out.square().sum().backward()
    return tau.grad, [t.grad for t in (*a, *b)], decision


def test_the_training_kernel_gives_the_threshold_the_gradient_of_computing_every_expert(monkeypatch):
    monkeypatch.setattr(routing, "THRESHOLD_BAND", 1.0)  # every slot within the band: exact agreement
    got, got_w, _ = _threshold_grad(0.55, dense=False)
    want, want_w, _ = _threshold_grad(0.55, dense=True)
    assert got.abs() > 0
    torch.testing.assert_close(got, want)
    for g, w in zip(got_w, want_w):
        torch.testing.assert_close(g, w)


def test_the_training_kernel_leaves_out_the_slots_beyond_the_band():
    tau = torch.tensor(0.3, dtype=torch.float64)
    x, decision, a, b, scale = _kernel_case(tau)
    mixture_delta(x, decision, a, b, scale).sum().backward()
    computed = int(decision.computed.sum())
    kept = int((decision.gates != 0).sum())
    assert kept < computed < 32  # the band adds some dropped slots, not all
    assert sum(decision.memo("segments", lambda: None).counts) == computed


def _model(**changes):
    config = DyLoRAMoEConfig(num_experts=4, r=4, alpha=8, top_k=3, top_p=0.5, threshold_learned=True, **changes)
    model = DyLoRAMoEForCausalLM(make_base("llama"), config, mature=True)
    randomize_experts(model)
    return model


@pytest.mark.parametrize("routing_kind", ["token", "sequence"])
def test_a_model_with_learned_thresholds_trains_them_and_reports_k(routing_kind, batch):
    ids, mask, labels = batch
    model = _model(routing=routing_kind, dynamic_k_coef=0.1)
    thresholds = model.threshold_parameters()
    assert len(thresholds) == (1 if routing_kind == "sequence" else 2)  # one per router
    assert all(p.shape == (1,) for p in thresholds)
    assert {id(p) for p in thresholds} <= {id(p) for p in model.trainable_parameters()}
    torch.testing.assert_close(torch.sigmoid(thresholds[0]), torch.tensor([0.5]))
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert 1.0 <= out.active_experts.item() <= 3.0 and out.dynamic_k_loss is not None
    torch.testing.assert_close(out.loss, out.lm_loss + 0.01 * out.aux_loss + 0.1 * out.dynamic_k_loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in thresholds)


def test_without_a_learned_threshold_nothing_changes(batch):
    ids, mask, labels = batch
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=4, r=4, top_k=2), mature=True)
    assert model.threshold_parameters() == [] and all(r.threshold_logit is None for r in model.routers)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.dynamic_k_loss is None and out.active_experts.item() == 2.0
    assert not any("threshold" in name for name in model.state_dict())


def test_learned_thresholds_are_saved_loaded_and_kept_when_the_pool_grows(tmp_path, batch):
    model = _model()
    with torch.no_grad():
        model.threshold_parameters()[0].fill_(0.7)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", make_base("llama"))
    assert loaded.moe_config.threshold_learned and loaded.threshold_parameters()[0].item() == pytest.approx(0.7)
    ids, mask, _ = batch
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits)
    model.add_expert(rank=4, alpha=8)
    assert model.threshold_parameters()[0].item() == pytest.approx(0.7)


@pytest.mark.parametrize("changes, field", [
    ({"threshold_learned": True, "top_k": 2}, "threshold_learned"),                    # no starting value
    ({"threshold_learned": True, "top_k": 2, "top_p": 1.0}, "threshold_learned"),      # logit of 1 is infinite
    ({"threshold_learned": True, "top_k": 1, "top_p": 0.5}, "threshold_learned"),      # nothing to learn
    ({"dynamic_k_coef": 0.1, "top_k": 2, "top_p": 0.5}, "dynamic_k_coef"),              # a penalty on nothing
    ({"dynamic_k_coef": -1.0, "top_k": 2, "top_p": 0.5, "threshold_learned": True}, "dynamic_k_coef"),
])
def test_bad_dynamic_k_settings_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        DyLoRAMoEConfig(num_experts=4, **changes)


def test_decoding_many_tokens_computes_only_the_kept_pairs_and_matches_every_expert(monkeypatch):
    """The grouped inference kernel (>= 128 tokens) leaves out the pairs of gate 0 and still gives the dense sum."""
    from dylora_moe import experts

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 96, D_IN, generator=gen, dtype=torch.float64)
    logits = torch.randn(2, 96, 4, generator=gen, dtype=torch.float64) * 2
    decision = decide(logits, torch.ones(2, 96, dtype=torch.bool), mode="sparse", top_k=2, temperature=1.0,
                      threshold=torch.tensor(0.5, dtype=torch.float64))
    a = [torch.randn(3, D_IN, generator=gen, dtype=torch.float64) for _ in range(4)]
    b = [torch.randn(D_OUT, 3, generator=gen, dtype=torch.float64) for _ in range(4)]
    scale = torch.tensor([2.0, 1.0, 0.5, 1.5], dtype=torch.float64)
    rows = []
    real = torch.Tensor.index_select
    monkeypatch.setattr(torch.Tensor, "index_select",
                        lambda self, dim, index: rows.append(index.numel()) or real(self, dim, index))
    with torch.no_grad():
        got = mixture_delta(x, decision, a, b, scale)
    monkeypatch.undo()
    kept = int((decision.gates != 0).sum())
    assert kept < 2 * 192 and sum(rows) == kept  # only the kept pairs' rows were gathered
    w = decision.dense_weights() * scale
    torch.testing.assert_close(got, sum(w[..., e:e + 1] * ((x @ a[e].t()) @ b[e].t()) for e in range(4)))
    assert experts.GROUPED_TOKEN_MIN_TOKENS <= 192

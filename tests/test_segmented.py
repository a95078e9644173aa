"""The segmented training kernel of token routing: its hand-written backward against autograd's."""

import pytest
import torch

from dylora_moe.experts import mixture_delta, stack_experts
from dylora_moe.routing import decide
from dylora_moe.segmented import build_segments, segmented_lora

D_IN, D_OUT = 7, 5


def weights(ranks, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = [torch.randn(r, D_IN, generator=gen, dtype=dtype, requires_grad=True) for r in ranks]
    b = [torch.randn(D_OUT, r, generator=gen, dtype=dtype, requires_grad=True) for r in ranks]
    return a, b


def reference(x, indices, gamma_flat, a_list, b_list):
    """Autograd through a per-pair loop: y[t] = sum_slot gamma[t, slot] * B_e A_e x[t]."""
    n, k = indices.shape
    rows = []
    for t in range(n):
        y = x.new_zeros(D_OUT)
        for s in range(k):
            e = int(indices[t, s])
            y = y + gamma_flat[t * k + s] * (b_list[e] @ (a_list[e] @ x[t]))
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("ranks", [[3, 3, 3, 3], [2, 4, 1, 3]])
def test_forward_and_every_gradient_equal_autograd_of_a_loop(k, ranks):
    gen = torch.Generator().manual_seed(1)
    n = 9
    x = torch.randn(n, D_IN, generator=gen, dtype=torch.float64, requires_grad=True)
    indices = torch.stack([torch.randperm(4, generator=gen)[:k] for _ in range(n)])
    gamma = torch.rand(n * k, generator=gen, dtype=torch.float64, requires_grad=True)
    a_list, b_list = weights(ranks)
    seg = build_segments(indices, 4)
    got = segmented_lora(x, seg.sort(gamma), seg, a_list, b_list)
    want = reference(x, indices, gamma, a_list, b_list)
    assert torch.allclose(got, want, atol=1e-12)
    upstream = torch.randn(n, D_OUT, generator=gen, dtype=torch.float64)
    params = [x, gamma, *a_list, *b_list]
    g_got = torch.autograd.grad(got, params, upstream)
    g_want = torch.autograd.grad(want, params, upstream)
    for name, u, v in zip(["x", "gamma"] + [f"p{i}" for i in range(8)], g_got, g_want):
        assert torch.allclose(u, v, atol=1e-12), name


def test_gradcheck():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, D_IN, generator=gen, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([[0, 2], [2, 1], [1, 0], [2, 0], [0, 1], [1, 2]])
    gamma = torch.rand(12, generator=gen, dtype=torch.float64, requires_grad=True)
    a_list, b_list = weights([2, 3, 2])
    seg = build_segments(indices, 3)

    def f(x, gamma, *w):
        return segmented_lora(x, gamma, seg, list(w[:3]), list(w[3:]))

    assert torch.autograd.gradcheck(f, (x, seg.sort(gamma).detach().requires_grad_(), *a_list, *b_list))


def test_an_expert_no_token_chose_gets_an_exact_zero_gradient_and_the_others_a_real_one():
    x = torch.randn(5, D_IN, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([[0], [2], [0], [2], [2]])
    a_list, b_list = weights([3, 3, 3])
    seg = build_segments(indices, 3)
    assert seg.counts == (2, 0, 3)
    segmented_lora(x, torch.ones(5, dtype=torch.float64), seg, a_list, b_list).sum().backward()
    assert torch.equal(a_list[1].grad, torch.zeros_like(a_list[1]))
    assert torch.equal(b_list[1].grad, torch.zeros_like(b_list[1]))
    for e in (0, 2):
        assert a_list[e].grad.abs().sum() > 0 and b_list[e].grad.abs().sum() > 0


def test_a_shared_a_receives_the_sum_of_every_experts_gradient():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, D_IN, generator=gen, dtype=torch.float64)
    indices = torch.randint(0, 3, (8, 1), generator=gen)
    shared = torch.randn(2, D_IN, generator=gen, dtype=torch.float64, requires_grad=True)
    _, b_list = weights([2, 2, 2])
    seg = build_segments(indices, 3)
    segmented_lora(x, torch.ones(8, dtype=torch.float64), seg, [shared] * 3, b_list).sum().backward()
    copies = [shared.detach().clone().requires_grad_() for _ in range(3)]
    reference(x, indices, torch.ones(8, dtype=torch.float64), copies, b_list).sum().backward()
    assert torch.allclose(shared.grad, sum(c.grad for c in copies), atol=1e-12)


def test_in_training_token_routing_equals_the_stacked_kernel_and_builds_its_plan_once_per_decision():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, D_IN, generator=gen, requires_grad=True)
    logits = torch.randn(2, 6, 4, generator=gen, requires_grad=True)
    decision = decide(logits, torch.ones(2, 6, dtype=torch.bool), mode="sparse", top_k=2, temperature=1.0)
    a_list, b_list = weights([3] * 4, dtype=torch.float32)
    scale = torch.tensor([2.0, 1.0, 0.5, 3.0])
    got = mixture_delta(x, decision, a_list, b_list, scale)
    plan = decision.memo("segments", lambda: pytest.fail("the plan was not kept with the decision"))
    assert sum(plan.counts) == 2 * 6 * 2
    a, b = stack_experts(a_list, b_list)
    from dylora_moe.experts import _dense

    want = _dense(x, decision.dense_weights() * scale, a, b)
    assert torch.allclose(got, want, atol=1e-5)
    params = [x, logits, *a_list, *b_list]
    for u, v in zip(torch.autograd.grad(got.square().sum(), params, retain_graph=True),
                    torch.autograd.grad(want.square().sum(), params)):
        assert torch.allclose(u, v, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("grad", [True, False])
def test_one_expert_for_every_token_gathers_nothing_and_computes_the_same(grad):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, D_IN, generator=gen, dtype=torch.float64, requires_grad=grad)
    indices = torch.full((6, 1), 1)
    gamma = torch.rand(6, generator=gen, dtype=torch.float64, requires_grad=grad)
    a_list, b_list = weights([2, 3, 2])
    seg = build_segments(indices, 3)
    assert seg.identity and seg.counts == (0, 6, 0)
    with torch.set_grad_enabled(grad):
        got = segmented_lora(x, seg.sort(gamma), seg, a_list, b_list)
        want = reference(x, indices, gamma, a_list, b_list)
    assert torch.allclose(got, want, atol=1e-12)
    if grad:
        params = [x, gamma, *a_list, *b_list]
        for u, v in zip(torch.autograd.grad(got.sum(), params), torch.autograd.grad(want.sum(), params,
                                                                                     allow_unused=True)):
            assert torch.allclose(u, torch.zeros_like(u) if v is None else v, atol=1e-12)


def test_pairs_left_out_cost_nothing_and_act_as_a_zero_gate():
    """Dynamic top-k leaves slots with gate 0: ``active`` leaves those pairs out of every segment; output and every
    gradient equal autograd of the loop with their weight 0."""
    gen = torch.Generator().manual_seed(4)
    n, k = 9, 2
    x = torch.randn(n, D_IN, generator=gen, dtype=torch.float64, requires_grad=True)
    indices = torch.stack([torch.randperm(4, generator=gen)[:k] for _ in range(n)])
    active = torch.ones(n, k, dtype=torch.bool)
    active[::2, 1] = False  # every other token uses one expert only
    active[3] = False  # and one token none at all
    raw = torch.rand(n * k, generator=gen, dtype=torch.float64, requires_grad=True)  # the gates before the mask
    a_list, b_list = weights([3, 2, 4, 3])
    seg = build_segments(indices, 4, active=active)
    assert sum(seg.counts) == int(active.sum()) == len(seg.token) < n * k
    got = segmented_lora(x, seg.sort(raw * active.reshape(-1)), seg, a_list, b_list)
    got.square().sum().backward()
    mine = [t.grad.clone() for t in (x, raw, *a_list, *b_list)]
    for t in (x, raw, *a_list, *b_list):
        t.grad = None
    want = reference(x, indices, raw * active.reshape(-1), a_list, b_list)
    want.square().sum().backward()
    assert torch.allclose(got, want, atol=1e-12) and torch.equal(got[3], torch.zeros(D_OUT, dtype=torch.float64))
    for m, t in zip(mine, (x, raw, *a_list, *b_list)):
        assert torch.allclose(m, t.grad, atol=1e-12)


def test_dynamic_top_k_trains_only_the_slots_it_keeps():
    """With ``top_p`` the token kernel leaves the unused slots (gate 0) out of its plan and matches the stacked
    kernel's output and gradients."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, D_IN, generator=gen, dtype=torch.float64)
    logits = torch.randn(2, 6, 4, generator=gen, dtype=torch.float64) * 3
    decision = decide(logits, torch.ones(2, 6, dtype=torch.bool), mode="sparse", top_k=2, temperature=1.0,
                      top_p=0.6)
    kept = int((decision.gates != 0).sum())
    assert 12 < kept < 24  # some tokens use one expert, some two
    a_list, b_list = weights([3, 3, 3, 3])
    scale = torch.tensor([2.0, 1.0, 0.5, 1.5], dtype=torch.float64)
    got = mixture_delta(x, decision, a_list, b_list, scale)
    assert sum(decision.memo("segments", lambda: None).counts) == kept
    got.square().sum().backward()
    mine = [t.grad.clone() for t in (*a_list, *b_list)]
    for t in (*a_list, *b_list):
        t.grad = None
    dense = decision.dense_weights() * scale  # [2, 6, 4]
    want = sum(dense[..., e:e + 1] * ((x @ a_list[e].t()) @ b_list[e].t()) for e in range(4))
    want.square().sum().backward()
    assert torch.allclose(got, want, atol=1e-12)
    for m, t in zip(mine, (*a_list, *b_list)):
        assert torch.allclose(m, t.grad, atol=1e-12)

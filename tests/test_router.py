"""Router networks: shapes, growth keeps old rows, factory errors."""

import pytest
import torch

from dylora_moe.router import ROUTER_GROWTH_ATOL, ROUTER_GROWTH_RTOL, LinearRouter, MLPRouter, build_router


@pytest.mark.exact
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_router_grows_keeping_rows(kind):
    """Growth keeps every old parameter bit for bit and every routing decision among the old experts; the old
    logits are the same maths but not the same bits on every CPU (the output layer is one column wider, and
    BLAS may sum in another order: 3e-8 seen on AVX-512), so they are compared with the stated tolerance."""
    torch.manual_seed(0)
    router = build_router(kind, 8, 3)
    old = {name: p.detach().clone() for name, p in router.named_parameters()}
    x = torch.randn(256, 8)
    before = router(x)
    top2 = before.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4  # no near tie: a decision cannot hinge on the last bit
    router.add_expert()
    after = router(x)
    assert after.shape == (256, 4) and router.num_experts == 4
    assert isinstance(router, LinearRouter if kind == "linear" else MLPRouter)
    for name, p in router.named_parameters():
        grown = p.shape != old[name].shape
        assert torch.equal(p[:3] if grown else p, old[name]), name
    torch.testing.assert_close(after[:, :3], before, rtol=ROUTER_GROWTH_RTOL, atol=ROUTER_GROWTH_ATOL)
    assert torch.equal(after[:, :3].argmax(-1), before.argmax(-1))
    assert torch.equal(after[:, :3].topk(2, dim=-1).indices, before.topk(2, dim=-1).indices)


def test_router_is_scale_invariant():
    router = build_router("linear", 8, 3)
    x = torch.randn(2, 8)
    assert torch.allclose(router(x), router(x * 100.0), atol=1e-5)


def test_unknown_router_type():
    with pytest.raises(ValueError, match="router_type='moe'"):
        build_router("moe", 8, 2)

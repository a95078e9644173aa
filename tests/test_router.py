"""Router networks: shapes, growth keeps old rows, factory errors."""

import pytest
import torch

from dylora_moe.router import LinearRouter, MLPRouter, build_router


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_router_grows_keeping_rows(kind):
    torch.manual_seed(0)
    router = build_router(kind, 8, 3)
    x = torch.randn(5, 8)
    before = router(x)
    router.add_expert()
    after = router(x)
    assert after.shape == (5, 4) and router.num_experts == 4
    assert torch.allclose(after[:, :3], before)
    assert isinstance(router, LinearRouter if kind == "linear" else MLPRouter)


def test_router_is_scale_invariant():
    router = build_router("linear", 8, 3)
    x = torch.randn(2, 8)
    assert torch.allclose(router(x), router(x * 100.0), atol=1e-5)


def test_unknown_router_type():
    with pytest.raises(ValueError, match="router_type='moe'"):
        build_router("moe", 8, 2)

"""The experts' input dropout: the CPU mask's rate, scale, gradient and seeding."""

import pytest
import torch

from dylora_moe.dropout import LANES, ExpertDropout, expert_dropout


def test_the_drop_rate_is_p_and_the_kept_values_are_scaled_so_the_mean_is_kept():
    torch.manual_seed(0)
    x = torch.ones(2000, 1000)
    y = expert_dropout(x, 0.05, training=True)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.05) < 0.001  # 2e6 draws: the standard error is 1.5e-4
    p_eff = round(0.05 * LANES) / LANES
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 1.0 / (1.0 - p_eff)))
    assert abs(y.mean().item() - 1.0) < 0.002
    # the 4 lanes of each random word are independent: no position pattern in the mask
    by_lane = (y == 0).reshape(-1, 4).float().mean(0)
    assert torch.all((by_lane - 0.05).abs() < 0.002)


def test_the_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(1)
    x = torch.randn(64, 33, requires_grad=True)
    y = expert_dropout(x, 0.3, training=True)
    upstream = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, upstream)
    keep = y != 0
    scale = 1.0 / (1.0 - round(0.3 * LANES) / LANES)
    assert torch.allclose(grad, torch.where(keep, upstream * scale, torch.zeros_like(upstream)))
    assert torch.allclose(y, torch.where(keep, x * scale, torch.zeros_like(x)))


def test_the_mask_follows_the_seed():
    x = torch.ones(10, 50)
    torch.manual_seed(5)
    a = expert_dropout(x, 0.5, True)
    torch.manual_seed(5)
    b = expert_dropout(x, 0.5, True)
    c = expert_dropout(x, 0.5, True)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_evaluation_zero_and_one():
    x = torch.randn(4, 8)
    module = ExpertDropout(0.5).eval()
    assert module(x) is x
    assert expert_dropout(x, 0.0, True) is x
    assert torch.equal(expert_dropout(x, 1.0, True), torch.zeros_like(x))
    assert expert_dropout(x.to(torch.bfloat16), 0.1, True).dtype == torch.bfloat16


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_a_probability_outside_0_1_is_refused(p):
    with pytest.raises(ValueError, match="dropout probability"):
        ExpertDropout(p)

"""cross_entropy.py: the same loss and logit gradient as F.cross_entropy, without its [N, V] intermediates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dylora_moe import cross_entropy as ce_module
from dylora_moe.cross_entropy import cross_entropy, linear_cross_entropy


def logits_and_targets(n=37, v=301, dtype=torch.float32, ignored=(3, 10, 11)):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, v, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[list(ignored)] = -100
    return logits, targets


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [1 << 24, 1000])  # one chunk, and several of a few rows (with a ragged last one)
def test_loss_and_gradient_match_torch(reduction, chunk, monkeypatch):
    monkeypatch.setattr(ce_module, "CHUNK_ELEMENTS", chunk)
    logits, targets = logits_and_targets()
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.clone().requires_grad_()
    ours = cross_entropy(ours_in, targets, reduction=reduction)
    ref = F.cross_entropy(ref_in, targets, reduction=reduction)
    (ours * 1.7).backward()
    (ref * 1.7).backward()
    assert ours.dtype == torch.float32 and ours.shape == ()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(ours_in.grad[[3, 10, 11]]) == 0  # ignored rows get no gradient


def test_bf16_logits_are_computed_in_float32_with_a_bf16_gradient():
    logits, targets = logits_and_targets(dtype=torch.bfloat16)
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.clone().requires_grad_()
    ours = cross_entropy(ours_in, targets)
    ref = F.cross_entropy(ref_in.float(), targets)
    ours.backward()
    ref.backward()
    assert ours.dtype == torch.float32 and ours_in.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-2, atol=1e-4)


def test_extreme_logits_stay_finite():
    logits, targets = logits_and_targets(ignored=())
    logits[0, 5] = 1e4
    logits[1] = -1e4
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))


def test_no_target_gives_nan_mean_as_torch_and_zero_sum():
    logits, _ = logits_and_targets()
    targets = torch.full((logits.shape[0],), -100)
    assert torch.isnan(cross_entropy(logits, targets)) and torch.isnan(F.cross_entropy(logits, targets))
    assert cross_entropy(logits, targets, reduction="sum") == 0


def test_bad_shapes_and_reductions_are_refused():
    logits, targets = logits_and_targets()
    with pytest.raises(ValueError, match=r"logits must be \[N, V\] and targets \[N\]; got \(1, 37, 301\)"):
        cross_entropy(logits[None], targets)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', not 'none'"):
        cross_entropy(logits, targets, reduction="none")


def head(v=301, h=24, dtype=torch.float32, bias=True):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(v, h, generator=gen).to(dtype)
    return weight, (torch.randn(v, generator=gen).to(dtype) if bias else None)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [1 << 24, 1000])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_cross_entropy_matches_the_head_then_torch(reduction, chunk, bias, monkeypatch):
    monkeypatch.setattr(ce_module, "CHUNK_ELEMENTS", chunk)
    _, targets = logits_and_targets()
    weight, b = head(bias=bias)
    hidden = torch.randn(37, 24, generator=torch.Generator().manual_seed(2))
    ours_in, ref_in = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    ours = linear_cross_entropy(ours_in, weight, b, targets, reduction=reduction)
    ref = F.cross_entropy(F.linear(ref_in, weight, b), targets, reduction=reduction)
    (ours * 0.3).backward()
    (ref * 0.3).backward()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(ours_in.grad[[3, 10, 11]]) == 0
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, b, targets, reduction=reduction), ref.detach())


def test_linear_cross_entropy_in_bf16_computes_the_softmax_in_float32():
    _, targets = logits_and_targets()
    weight, b = head(dtype=torch.bfloat16)
    hidden = torch.randn(37, 24, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    ours_in, ref_in = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    ours = linear_cross_entropy(ours_in, weight, b, targets)
    ref = F.cross_entropy(F.linear(ref_in, weight, b).float(), targets)
    ours.backward()
    ref.backward()
    assert ours.dtype == torch.float32 and ours_in.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=2e-2, atol=2e-3)


def test_linear_cross_entropy_refuses_a_trainable_head_and_bad_shapes():
    _, targets = logits_and_targets()
    weight, b = head()
    hidden = torch.randn(37, 24)
    with pytest.raises(ValueError, match="weight and bias must be frozen"):
        linear_cross_entropy(hidden, weight.requires_grad_(), b, targets)
    with pytest.raises(ValueError, match=r"hidden must be \[N, H\], weight \[V, H\].*got \(37, 23\), \(301, 24\)"):
        linear_cross_entropy(hidden[:, :23], weight.detach(), b, targets)

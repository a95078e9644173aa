"""Shared pytest fixtures (tiny models live in tests/tiny.py)."""

import pytest
import torch

from tests.tiny import VOCAB


@pytest.fixture
def batch():
    """Token ids ``[3, 12]``, a right-padded attention mask and labels masked on a 4-token prompt."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    return ids, mask, labels

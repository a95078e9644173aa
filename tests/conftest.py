"""Shared pytest fixtures (tiny models live in tests/tiny.py)."""

import os
from pathlib import Path

import pytest
import torch

from tests.tiny import VOCAB

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data directory of the ``integration`` tests: ``$DYLORA_MOE_DATA_DIR``, else ``../shared/data``.

    A missing directory fails the test (never skips it): a run that cannot check the real data must say so.
    """
    path = Path(os.environ.get("DYLORA_MOE_DATA_DIR") or ROOT.parent / "shared" / "data")
    if not (path / "mbpp" / "mbpp.jsonl").is_file() or not (path / "code_alpaca").is_dir():
        pytest.fail(f"real data not found at {path} (no mbpp/mbpp.jsonl or code_alpaca/): set DYLORA_MOE_DATA_DIR "
                    "or deselect with -m \"not integration\"")
    return path


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

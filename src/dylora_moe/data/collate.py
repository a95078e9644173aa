"""Padding collator: tokenized examples -> a batch of tensors (``torch.long``) for the training loop.

``collate_batch(batch, pad_token_id)`` and ``DataCollator`` (for ``DataLoader(collate_fn=...)``), over
:class:`~.formatting.TokenizedExample` objects or dicts with the same fields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .formatting import IGNORE_INDEX, TokenizedExample, resolve_pad_token_id

__all__ = ["DataCollator", "collate_batch"]


def _field(item: TokenizedExample | Mapping[str, Any], name: str) -> Any:
    return item[name] if isinstance(item, Mapping) else getattr(item, name)


def collate_batch(
    batch: Sequence[TokenizedExample | Mapping[str, Any]],
    pad_token_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad ``batch`` into tensors.

    Items are :class:`TokenizedExample`s or mappings with ``input_ids``, ``labels``, ``domain_id``.
    Returns ``input_ids`` [B, T] (pads = ``pad_token_id``), ``attention_mask`` [B, T] (1 = token),
    ``labels`` [B, T] (-100 on pads) and ``domain_ids`` [B], all ``torch.long``; ``T`` is the longest
    length, rounded up to ``pad_to_multiple_of``.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"'padding_side' must be 'right' or 'left', got {padding_side!r}")
    if not batch:
        raise ValueError("cannot collate an empty batch")
    ids = [list(_field(item, "input_ids")) for item in batch]
    labels = [list(_field(item, "labels")) for item in batch]
    for i, (a, b) in enumerate(zip(ids, labels, strict=True)):
        if len(a) != len(b):
            raise ValueError(f"batch item {i}: input_ids has {len(a)} tokens but labels has {len(b)}")
    length = max(len(a) for a in ids)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    label_t = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, (a, b) in enumerate(zip(ids, labels, strict=True)):
        span = slice(0, len(a)) if padding_side == "right" else slice(length - len(a), length)
        input_ids[row, span] = torch.tensor(a, dtype=torch.long)
        label_t[row, span] = torch.tensor(b, dtype=torch.long)
        mask[row, span] = 1
    domain_ids = torch.tensor([int(_field(item, "domain_id")) for item in batch], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t, "domain_ids": domain_ids}


@dataclass
class DataCollator:
    """Callable collate function for ``torch.utils.data.DataLoader(collate_fn=...)``."""

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, padding_side: str = "right", pad_to_multiple_of: int | None = None
    ) -> DataCollator:
        """Pad with the tokenizer's pad id (else EOS id); right padding unless told otherwise."""
        return cls(resolve_pad_token_id(tokenizer), padding_side, pad_to_multiple_of)

    def __call__(self, batch: Sequence[TokenizedExample | Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_batch(batch, self.pad_token_id, self.padding_side, self.pad_to_multiple_of)

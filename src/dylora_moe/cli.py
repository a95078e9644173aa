"""The ``dylora-moe`` command line, built from the typed config dataclasses.

Only this module parses argv; the library takes config objects. Every ``DyLoRAMoEConfig`` field
becomes an option (``--num-experts 8``, ``--target-modules q_proj,v_proj``) with its help text.

    dylora-moe report smollm2-135m --num-experts 4 --r 16
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from .config import ConfigError, DyLoRAMoEConfig


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    return hints.get(f.name, str)


def _parse_value(raw: str, annotation: Any) -> Any:
    """Convert a command-line string to the field's annotated type."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        # "a,b" is a list; a single word prefers a scalar type when the union has one
        options.sort(key=lambda a: (typing.get_origin(a) is list) != ("," in raw))
        for option in options:
            try:
                return _parse_value(raw, option)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"cannot parse {raw!r} as {annotation}")
    if origin is list:
        (item,) = args or (str,)
        return [_parse_value(part.strip(), item) for part in raw.split(",") if part.strip()]
    if annotation is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    return annotation(raw)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one ``--option`` per dataclass field, with the field's help text and default."""
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        flag = "--" + prefix + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        group.add_argument(flag, dest=prefix + f.name, default=None, metavar=f.name.upper(),
                           help=f"{f.metadata.get('help', '')} (default: {default!r})")


def dataclass_from_args(cls: type, ns: argparse.Namespace, prefix: str = "", base: Any = None):
    """Build ``cls`` from parsed options that were given (others keep ``base``'s or default values)."""
    values = dataclasses.asdict(base) if base is not None else {}
    for f in dataclasses.fields(cls):
        raw = getattr(ns, prefix + f.name, None)
        if raw is None:
            continue
        try:
            values[f.name] = _parse_value(raw, _field_type(cls, f))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--{prefix}{f.name.replace('_', '-')}={raw!r}: {exc}") from None
    return cls(**values)


def _cmd_report(ns: argparse.Namespace) -> int:
    from .loading import load_base_model
    from .model import DyLoRAMoEForCausalLM

    config = dataclass_from_args(DyLoRAMoEConfig, ns)
    base, _ = load_base_model(ns.model)
    model = DyLoRAMoEForCausalLM(base, config, base_name_or_path=ns.model)
    print(model.parameter_report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dylora-moe", description="Dynamic LoRA Mixture-of-Experts")
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="wrap a base model with experts and print the parameter report")
    report.add_argument("model", help="hub id, local folder, or the embedded default 'smollm2-135m'")
    add_dataclass_arguments(report, DyLoRAMoEConfig)
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .loading import BaseModelError
    from .serialization import CheckpointError
    from .targets import TargetError

    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except (ConfigError, TargetError, CheckpointError, BaseModelError) as exc:
        print(f"dylora-moe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

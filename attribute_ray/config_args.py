"""Command-line flags generated from a pydantic config, never restated (sparsify's pattern).

    add_arguments(parser, AttributionSettings)            # --max-n-logits N ... with each field's description
    settings = from_arguments(AttributionSettings, args)  # flags not given keep the config's defaults

A field ``foo_bar: T`` becomes ``--foo-bar``; bools become ``--foo-bar/--no-foo-bar``; ``Literal`` choices become
argparse choices; lists take comma-separated values. Integers accept ``1_000_000``. Validation (ranges,
cross-field checks) stays in the config: argparse only parses.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

M = TypeVar("M", bound=BaseModel)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_int(s: str) -> int:
    return int(s.replace("_", ""))


def _scalar(tp: Any) -> tuple[Any, list | None]:
    """(argparse type, choices) of a field annotation with Optional stripped."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = args[0] if len(args) == 1 else str
        args = list(typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return type(args[0]), list(args)
    if tp is int:
        return _parse_int, None
    if tp in (float, str):
        return tp, None
    return str, None


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config: type[BaseModel], *,
                  exclude: Iterable[str] = ()) -> None:
    """One flag per field of `config` (minus `exclude`); fields without a default are required flags."""
    exclude = set(exclude)
    for name, field in config.model_fields.items():
        if name in exclude:
            continue
        default = None if field.default is PydanticUndefined else field.default
        help_ = field.description or ""
        if default is not None:
            help_ = f"{help_} (default {default})" if help_ else f"default {default}"
        kwargs: dict[str, Any] = dict(dest=name, default=None, help=help_)
        origin = typing.get_origin(field.annotation)
        inner = [a for a in typing.get_args(field.annotation) if a is not type(None)]
        if field.annotation is bool:
            parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if origin is list or (inner and typing.get_origin(inner[0]) is list):
            item = typing.get_args(field.annotation if origin is list else inner[0])[0]
            conv, _ = _scalar(item)
            kwargs["type"] = lambda s, conv=conv: [conv(v) for v in s.split(",") if v]
        else:
            kwargs["type"], choices = _scalar(field.annotation)
            if choices:
                kwargs["choices"] = choices
        parser.add_argument(_flag(name), required=field.is_required(), **kwargs)


def from_arguments(config: type[M], args: argparse.Namespace, **extra: Any) -> M:
    """`config` from the flags that were given (others keep their defaults), plus `extra` fields."""
    given = {name: getattr(args, name) for name in config.model_fields if getattr(args, name, None) is not None}
    return config(**{**given, **extra})

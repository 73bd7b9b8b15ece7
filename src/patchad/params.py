"""Parsing ``--set key=value`` against a detector's constructor signature, so that command-line
flags can never drift from the code."""

from __future__ import annotations

import types
import typing
from typing import Any

from patchad.errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_value(key: str, text: str, annotation: Any) -> Any:
    """Convert ``text`` to the type named by ``annotation`` (int, float, bool, str, tuples of
    str, and ``X | None``), or raise a one-line :class:`ConfigError`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if text.strip().lower() in {"none", "null", ""} and len(args) < len(
            typing.get_args(annotation)
        ):
            return None
        for arg in args[:-1]:  # the first member that parses, e.g. int before str
            try:
                return parse_value(key, text, arg)
            except ConfigError:
                continue
        return parse_value(key, text, args[-1])
    if origin is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    try:
        if annotation is bool:
            lowered = text.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
    except ValueError:
        name = getattr(annotation, "__name__", str(annotation))
        raise ConfigError(f"--set {key}={text}: expected {name}") from None
    return text


def parse_settings(pairs: list[str], types_by_name: dict[str, Any]) -> dict[str, Any]:
    """Parse ``["key=value", ...]``; unknown keys raise an error that lists the valid ones."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {pair}: expected key=value")
        if key not in types_by_name:
            raise ConfigError(
                f"--set {key}: unknown parameter; valid keys: {', '.join(types_by_name)}"
            )
        settings[key] = parse_value(key, value, types_by_name[key])
    return settings

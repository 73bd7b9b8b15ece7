"""A detector's constructor parameters: reading them (:class:`Parameters`) and parsing
``--set key=value`` against the constructor's signature, so that command-line flags can never
drift from the code."""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

from patchad.errors import ConfigError


class Parameters:
    """Estimator-style access to the constructor parameters, which each detector stores as
    attributes of the same names."""

    @classmethod
    def param_names(cls) -> list[str]:
        """Constructor parameter names, in signature order."""
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @classmethod
    def param_types(cls) -> dict[str, Any]:
        """Constructor parameter annotations, resolved."""
        hints = typing.get_type_hints(cls.__init__)
        return {name: hints[name] for name in cls.param_names()}

    def get_params(self) -> dict[str, Any]:
        """The constructor parameters as stored (JSON-friendly)."""
        return {name: getattr(self, name) for name in self.param_names()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


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

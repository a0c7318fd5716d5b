"""Settings objects, and the one codec that reads and writes them as plain values.

Every part of hetkd keeps its settings in a small frozen, keyword-only dataclass
written next to the code that uses it (:class:`hetkd.training.TrainingConfig`,
:class:`hetkd.distill.similarity.NeighbourSearch`, ...). Its field defaults are
the only place a default is written, and its ``__post_init__`` checks its
values with :func:`require` and :func:`require_choice`, which raise
:class:`SettingsError` naming the field.

Three places read such objects from plain values — the run config
(:mod:`hetkd.config`, from YAML and Flower's run config), the wire messages
(:mod:`hetkd.protocol`, from a message's records) and the pyproject table —
and all three go through :func:`build`, which checks types, refuses unknown
and missing fields, and names the dotted path of whatever is wrong
(``strategy.kd.rho``). :func:`flatten` is its inverse.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, Union

__all__ = [
    "SettingsError",
    "require",
    "require_choice",
    "require_types",
    "did_you_mean",
    "build",
    "flatten",
    "unflatten",
    "field_types",
    "optional_type",
    "with_overrides",
]

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting is missing, unknown, of the wrong type or out of range; ``key`` names it."""

    #: how the key is introduced in the message ("config key", "message field", ...)
    kind = "setting"

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{self.kind} '{key}': {message}")

    def within(self, prefix: str, kind: type[SettingsError] | None = None) -> SettingsError:
        """The same error for the field ``key`` of the group at ``prefix`` (as ``kind``)."""
        key = f"{prefix}.{self.key}" if prefix else self.key
        return (kind or type(self))(key, self.message)


def require(condition: bool, key: str, message: str) -> None:
    """Raise :class:`SettingsError` for ``key`` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise SettingsError(key, message)


def require_types(settings: Any) -> None:
    """Raise :class:`SettingsError` for the first field of a settings dataclass whose value is not of
    its annotated type (an ``int`` passes for a ``float``). Settings classes call it first in
    ``__post_init__``, so a value of the wrong type is refused however the object is made."""
    for name, annotation in field_types(type(settings)).items():
        _convert(getattr(settings, name), annotation, name)


def did_you_mean(value: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def require_choice(value: Any, key: str, choices: Sequence[str]) -> None:
    """Raise :class:`SettingsError` for ``key`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise SettingsError(
            key, f"unknown value {value!r}{did_you_mean(value, choices)}; valid choices: {', '.join(choices)}"
        )


# --------------------------------------------------------------------------- types


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """``{field name: resolved annotation}`` of a dataclass (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def optional_type(annotation: Any) -> tuple[bool, Any]:
    """``(True, X)`` for ``X | None``, else ``(False, annotation)``."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) < len(typing.get_args(annotation)):
            return True, args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007
    return False, annotation


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _convert(value: Any, annotation: Any, key: str, complete: bool = False) -> Any:
    """``value`` as the type ``annotation`` names, or :class:`SettingsError` naming ``key``."""
    optional, annotation = optional_type(annotation)
    if value is None:
        if optional:
            return None
        raise SettingsError(key, f"must be {_type_name(annotation)}, not empty")
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin in (tuple, list):
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(annotation)[:1] or (Any,)
            items = [_convert(v, item, f"{key}[{i}]", complete) for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
    elif dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if isinstance(value, Mapping):
            return build(annotation, value, key, complete=complete)
    elif isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
    elif origin is not None and isinstance(origin, type):  # e.g. dict[str, np.ndarray]
        if isinstance(value, origin):
            return value
    else:
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise SettingsError(key, f"must be {_type_name(annotation)}, got the non-finite value {value}")
    raise SettingsError(key, f"must be {_type_name(annotation)}, got {type(value).__name__} {value!r}"[:300])


# --------------------------------------------------------------------------- build / flatten


def build(cls: type[T], values: Mapping[str, Any], path: str = "", *, complete: bool = False) -> T:
    """An instance of the dataclass ``cls`` from plain ``values`` (nested mappings for nested groups).

    Fields missing from ``values`` take their default; a field without a
    default must be present, and with ``complete`` every field must be but
    those that may be ``None`` (what a wire message needs: no fallbacks).
    Unknown fields, values of the wrong type and values the class's own checks
    refuse raise :class:`SettingsError` naming the dotted key (``path`` is the
    group's own key).
    """
    if not isinstance(values, Mapping):
        raise SettingsError(path or cls.__name__, f"must be a group of settings, got {type(values).__name__}")
    types_ = field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        name = unknown[0]
        raise SettingsError(
            _join(path, name),
            f"unknown field{did_you_mean(name, list(types_))}; valid fields: {', '.join(types_)}",
        )
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = _join(path, f.name)
        if f.name in values:
            kwargs[f.name] = _convert(values[f.name], types_[f.name], key, complete)
        elif complete and not optional_type(types_[f.name])[0]:
            raise SettingsError(key, "required field is missing")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SettingsError(key, "required field is missing")
    try:
        return cls(**kwargs)
    except SettingsError as err:
        raise err.within(path) from None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def flatten(obj: Any, prefix: str = "", *, keep_none: bool = False) -> dict[str, Any]:
    """``{dotted.key: value}`` of a settings dataclass, nested groups included.

    Tuples become lists; ``None`` fields are left out unless ``keep_none``.
    """
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = _join(prefix, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(flatten(value, key, keep_none=keep_none))
        elif value is None and not keep_none:
            continue
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nested mappings from ``{dotted.key: value}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *groups, name = key.split(".")
        for group in groups:
            node = node.setdefault(group, {})
            if not isinstance(node, dict):
                raise SettingsError(key, f"'{group}' is both a value and a group")
        node[name] = value
    return out


def with_overrides(cls: type[T], base: T | None, overrides: Mapping[str, Any]) -> T:
    """``base`` (default: ``cls()``) with the fields in ``overrides`` replaced, checked by name."""
    if base is None:
        base = cls()
    if not isinstance(base, cls):
        raise TypeError(f"settings must be a {cls.__name__}, got {type(base).__name__}")
    if not overrides:
        return base
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise TypeError(f"unknown {cls.__name__} field(s) {unknown}; valid: {', '.join(sorted(values))}")
    return dataclasses.replace(base, **overrides)  # type: ignore[type-var]

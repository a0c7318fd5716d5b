"""How a typed message becomes a Flower ``RecordDict`` and back.

A message is a frozen, keyword-only dataclass (:class:`Request` from the server,
:class:`Reply` from a device). Its fields say where each value travels:

* numbers, strings, booleans and lists of them, and the fields of nested
  settings groups (dotted keys: ``kd.rho``), go into the ConfigRecord
  ``config`` — in a reply, the numbers go into the MetricRecord ``metrics``
  instead, where Flower's own aggregation looks for them;
* ``np.ndarray`` fields go into the ArrayRecord ``arrays``, one entry per field;
* :data:`StateDict` fields (a model's weights) go into an ArrayRecord of their own.

A field that may be ``None`` is left out when it is; every other field is
required. :meth:`WireMessage.from_record` refuses a record, a key or a value it
does not expect with :class:`ProtocolError`, naming the field, so nothing
travels that the type does not declare and nothing is filled in by a default.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from hetkd.settings import SettingsError, build, field_types, optional_type, unflatten

__all__ = ["ProtocolError", "StateDict", "WireMessage", "Request", "Reply", "CONFIG", "METRICS", "ARRAYS"]

#: a model's weights on the wire: parameter name -> tensor
StateDict = dict[str, torch.Tensor]

CONFIG = "config"
METRICS = "metrics"
ARRAYS = "arrays"

M = TypeVar("M", bound="WireMessage")


class ProtocolError(SettingsError):
    """A message lacks a field, carries one its type does not declare, or holds a bad value."""

    kind = "message field"


def _kind(annotation: Any) -> str:
    """``array``, ``state``, ``group`` or ``scalar``: where a field of this type travels."""
    _, annotation = optional_type(annotation)
    if annotation is np.ndarray:
        return "array"
    if annotation == StateDict:
        return "state"
    if dataclasses.is_dataclass(annotation):
        return "group"
    return "scalar"


def _plain(value: Any) -> Any:
    """A scalar or list as Flower's records take it (no numpy scalars, no tuples)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class WireMessage:
    """Base of every hetkd message (see the module docstring)."""

    #: where the numbers of this message travel: ``config`` (requests) or ``metrics`` (replies)
    numbers_in: ClassVar[str] = CONFIG

    # ------------------------------------------------------------------ encode

    def _split(self, obj: Any, prefix: str, out: dict[str, dict[str, Any]]) -> None:
        for name, annotation in field_types(type(obj)).items():
            value = getattr(obj, name)
            key = f"{prefix}{name}"
            if value is None:
                continue
            kind = _kind(annotation)
            if kind == "array":
                out[ARRAYS][key] = Array(np.ascontiguousarray(value))
            elif kind == "state":
                out.setdefault(f"state:{key}", {}).update(value)
            elif kind == "group":
                self._split(value, f"{key}.", out)
            elif self.numbers_in == METRICS and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[METRICS][key] = _plain(value)
            elif self.numbers_in == METRICS and isinstance(value, (list, tuple)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
            ):
                out[METRICS][key] = _plain(value)
            else:
                out[CONFIG][key] = _plain(value)

    def to_record(self) -> RecordDict:
        """The message as Flower's records."""
        parts: dict[str, dict[str, Any]] = {CONFIG: {}, METRICS: {}, ARRAYS: {}}
        self._split(self, "", parts)
        content = RecordDict()
        if parts[CONFIG] or self.numbers_in == CONFIG:
            content[CONFIG] = ConfigRecord(parts[CONFIG])
        if parts[METRICS] or self.numbers_in == METRICS:
            content[METRICS] = MetricRecord(parts[METRICS])
        if parts[ARRAYS]:
            content[ARRAYS] = ArrayRecord(parts[ARRAYS])
        for name, state in parts.items():
            if name.startswith("state:"):
                content[name.removeprefix("state:")] = ArrayRecord(
                    {k: v.detach().cpu() if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))
                     for k, v in state.items()}
                )
        return content

    # ------------------------------------------------------------------ decode

    @classmethod
    def _places(cls) -> dict[str, str]:
        """``{field path: the record it travels in}`` for every leaf field."""
        places = {}
        for kind, annotation, path in _fields(cls, ""):
            if kind == "array":
                places[path] = ARRAYS
            elif kind == "state":
                places[path] = path
            else:
                places[path] = METRICS if cls.numbers_in == METRICS and _numeric(annotation) else CONFIG
        return places

    @classmethod
    def record_names(cls) -> frozenset[str]:
        """The records a message of this type may hold: the allow-list of its wire form."""
        return frozenset({cls.numbers_in, *cls._places().values()})

    @classmethod
    def from_record(cls: type[M], content: RecordDict) -> M:
        """The message ``content`` holds; :class:`ProtocolError` names what is wrong with it."""
        allowed = cls.record_names()
        extra = sorted(set(content.keys()) - allowed)
        if extra:
            raise ProtocolError(extra[0], f"unexpected record for {cls.__name__}; it may hold {sorted(allowed)}")
        places, flat = cls._places(), {}
        for name, record in content.items():
            if isinstance(record, (ConfigRecord, MetricRecord)) and name in (CONFIG, METRICS):
                entries = dict(record)
            elif isinstance(record, ArrayRecord) and name == ARRAYS:
                entries = {k: a.numpy() for k, a in record.items()}
            elif isinstance(record, ArrayRecord):
                entries = {name: record.to_torch_state_dict()}
            else:
                raise ProtocolError(name, f"is a {type(record).__name__}, not the record {cls.__name__} expects")
            for key in entries:
                if places.get(key, name) != name:  # unknown keys are named by build() below
                    raise ProtocolError(key, f"travels in the '{places[key]}' record, not in '{name}'")
            flat.update(entries)
        try:
            values = unflatten(flat)
            return build(cls, values, complete=True)
        except ProtocolError:
            raise
        except SettingsError as err:
            raise ProtocolError(err.key, err.message) from None


def _fields(cls: type, prefix: str) -> list[tuple[str, Any, str]]:
    """``(kind, annotation, dotted path)`` of every leaf field of a message type, nested groups included."""
    out = []
    for name, annotation in field_types(cls).items():
        kind = _kind(annotation)
        if kind == "group":
            out.extend(_fields(optional_type(annotation)[1], f"{prefix}{name}."))
        else:
            out.append((kind, annotation, f"{prefix}{name}"))
    return out


def _numeric(annotation: Any) -> bool:
    """Whether a field holds numbers (which a reply sends in its MetricRecord)."""
    annotation = optional_type(annotation)[1]
    if annotation in (int, float):
        return True
    args = typing.get_args(annotation)
    return typing.get_origin(annotation) in (list, tuple) and bool(args) and args[0] in (int, float)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Request(WireMessage):
    """What the server sends a device: one Flower message type, answered by one :class:`Reply` type."""

    message_type: ClassVar[str]
    reply_type: ClassVar[type[Reply]]

    def message(self, node_id: int) -> Message:
        """This request as a Flower ``Message`` to ``node_id``."""
        return Message(self.to_record(), node_id, self.message_type)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Reply(WireMessage):
    """What a device answers: facts and numbers the server reads, and nothing else.

    ``handler_seconds`` and ``peak_rss_mb`` (the device process's peak memory)
    are filled in by the ClientApp around every handler.
    """

    numbers_in: ClassVar[str] = METRICS

    handler_seconds: float = math.nan
    peak_rss_mb: float = math.nan

    def message(self, request: Message) -> Message:
        """This reply as a Flower ``Message`` answering ``request``."""
        return Message(self.to_record(), reply_to=request)

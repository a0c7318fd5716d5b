"""What a node says about itself: the ``--node-config`` of its SuperNode.

In simulation Flower sets ``partition-id`` and ``num-partitions`` for every
node. In deployment the operator of each SuperNode writes them::

    flower-supernode ... --node-config "partition-id=2 num-partitions=3 model='resnet8' state-dir='/var/lib/hetkd'"

=================  ========  ============================================================
key                required  meaning
=================  ========  ============================================================
``partition-id``   yes       which device this node is: its data partition (0-based)
``num-partitions`` no        how many devices the federation has (Flower's convention; the
                             run's ``simulation.num_devices`` decides how data is split)
``model``          no        the architecture this device holds (a zoo name or
                             ``package.module:factory``), in place of ``models.assignment``
``state-dir``      no        a folder where the device keeps its weights and optimizer
                             between rounds and across restarts of the SuperNode
                             (default: Flower's ``Context.state``, lost on restart)
=================  ========  ============================================================

:func:`parse_node_config` checks them and raises :class:`NodeConfigError`,
whose message names the bad key, so a SuperNode started with a typo is
reported (by the device's reply and in the server's ``failures``) with the key
to fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["NodeConfig", "NodeConfigError", "NODE_CONFIG_KEYS", "parse_node_config"]

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
MODEL = "model"
STATE_DIR = "state-dir"
#: every key a hetkd device reads from its node config
NODE_CONFIG_KEYS = (PARTITION_ID, NUM_PARTITIONS, MODEL, STATE_DIR)


class NodeConfigError(ValueError):
    """A node config key is missing, unknown or has a bad value; the message names it."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"node config '{key}'{message}")


@dataclass(frozen=True)
class NodeConfig:
    """A checked node config (see the module docstring for the keys)."""

    partition_id: int
    num_partitions: int | None = None
    model: str | None = None
    state_dir: Path | None = None


def _integer(node_config: Mapping[str, Any], key: str) -> int | None:
    value = node_config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise NodeConfigError(key, f": must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise NodeConfigError(key, f": must be an integer, got {value!r}") from None


def _text(node_config: Mapping[str, Any], key: str) -> str | None:
    value = node_config.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise NodeConfigError(key, f": must be a non-empty string (quote it: {key}='...'), got {value!r}")
    return value.strip()


def parse_node_config(node_config: Mapping[str, Any], num_devices: int | None = None, strict: bool = True) -> NodeConfig:
    """Check a node's config against the keys above.

    ``num_devices`` is the run's number of devices (``None``: not known, as
    for a device of one's own whose federation size only the server knows);
    when given, ``partition-id`` must lie in ``0..num_devices-1``, otherwise
    below ``num-partitions`` if that is set. With ``strict`` (hetkd's own
    ClientApp) any other key is an error; a ClientApp of the user's own may
    read keys of its own (``strict=False``).
    """
    for key in node_config if strict else ():
        if key not in NODE_CONFIG_KEYS:
            close = difflib.get_close_matches(str(key), NODE_CONFIG_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise NodeConfigError(str(key), f": unknown key{hint}; valid keys: {', '.join(NODE_CONFIG_KEYS)}")
    partition_id = _integer(node_config, PARTITION_ID)
    if partition_id is None:
        span = f"0..{num_devices - 1}" if num_devices else "0..N-1"
        raise NodeConfigError(
            PARTITION_ID, f": missing; start the SuperNode with --node-config \"{PARTITION_ID}=<{span}>\""
        )
    num_partitions = _integer(node_config, NUM_PARTITIONS)
    if num_partitions is not None and num_partitions < 1:
        raise NodeConfigError(NUM_PARTITIONS, f": must be >= 1, got {num_partitions}")
    limit = num_devices if num_devices is not None else num_partitions
    if partition_id < 0 or (limit is not None and partition_id >= limit):
        where = f"0..{limit - 1}" if limit is not None else ">= 0"
        source = "simulation.num_devices" if num_devices is not None else NUM_PARTITIONS
        raise NodeConfigError(PARTITION_ID, f"={partition_id} is outside {where} ({source})")
    state_dir = _text(node_config, STATE_DIR)
    return NodeConfig(
        partition_id=partition_id,
        num_partitions=num_partitions,
        model=_text(node_config, MODEL),
        state_dir=Path(state_dir).expanduser() if state_dir else None,
    )

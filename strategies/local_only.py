"""Local-only training: every device learns from its own data alone.

The lower bound every collaborative strategy must beat. Nothing but scalar
metrics ever leaves a device.
"""

from __future__ import annotations

from hetkd.strategies.base import DeviceStrategy

__all__ = ["LocalOnly"]


class LocalOnly(DeviceStrategy):
    """Devices train on their private data each round (:class:`~hetkd.protocol.LocalTrainRequest`); no exchange."""

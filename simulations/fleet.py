"""Where SuperNodes reach the SuperLink: the one place hetkd tells Flower releases apart.

hetkd supports Flower 1.39 through 1.42. Their Message API is the same; what
changed is deployment:

* up to 1.39 the SuperLink serves the Fleet API (what SuperNodes connect to)
  over gRPC on a port of its own (``--fleet-api-address``, 9092 by default),
  beside its HTTP port (``--host/--port``, 8000) for the Control API;
* from 1.40 the Fleet, Control and Runtime APIs share the SuperLink's one HTTP
  port (``--host/--port``, 127.0.0.1:8000 by default); ``--fleet-api-address``
  only warns, and a SuperNode's ``--superlink`` names that port.

:data:`FLEET_ON_SUPERLINK_PORT` is read from the installed Flower;
:func:`superlink_address_args` and :func:`fleet_address` give the command-line
pieces that differ.
"""

from __future__ import annotations

from importlib.metadata import version

from packaging.version import Version

__all__ = ["FLOWER_VERSION", "FLEET_ON_SUPERLINK_PORT", "superlink_address_args", "fleet_address"]

#: the installed Flower release
FLOWER_VERSION = Version(version("flwr"))
#: whether the Fleet API is served on the SuperLink's HTTP port (1.40 and later)
FLEET_ON_SUPERLINK_PORT = FLOWER_VERSION >= Version("1.40")


def superlink_address_args(host: str, port: int, fleet_port: int | None) -> list[str]:
    """``flower-superlink`` arguments for where it listens: its HTTP port, and up to 1.39 the Fleet port."""
    args = ["--host", host, "--port", str(port)]
    if not FLEET_ON_SUPERLINK_PORT:
        if fleet_port is None:
            raise ValueError(f"Flower {FLOWER_VERSION} serves the Fleet API on a port of its own: give fleet_port")
        args += ["--fleet-api-address", f"{host}:{fleet_port}"]
    return args


def fleet_address(host: str, port: int, fleet_port: int | None) -> str:
    """What a SuperNode's ``--superlink`` names: the SuperLink's port (1.40+) or its Fleet port (up to 1.39)."""
    if FLEET_ON_SUPERLINK_PORT:
        return f"{host}:{port}"
    if fleet_port is None:
        raise ValueError(f"Flower {FLOWER_VERSION} serves the Fleet API on a port of its own: give fleet_port")
    return f"{host}:{fleet_port}"

"""From a config to a strategy: the names ``strategy.name`` accepts.

Strategies take explicit keyword arguments (so they plug into any
``ServerApp``); this registry is the one place that maps a
:class:`~hetkd.config.HetkdConfig` onto those arguments.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import ArrayRecord
from hetkd.strategies import DeviceStrategy, FedAvg, LocalOnly

from hetkd.config import ConfigError, HetkdConfig
from hetkd.data import Federation
from hetkd.models import assign_architectures, build_model
from hetkd.training import seeded

__all__ = ["STRATEGIES", "StrategySpec", "build_strategy", "check_strategy", "initial_arrays"]


def _common(cfg: HetkdConfig, device_config: str) -> dict[str, object]:
    s = cfg.strategy
    return {
        "fraction_train": s.fraction_train,
        "fraction_evaluate": s.fraction_evaluate,
        "min_devices": s.min_devices,
        "num_devices": cfg.simulation.num_devices,
        "evaluate_every": s.evaluate_every,
        "seed": cfg.seed,
        "device_config": device_config,
        "wait_for_devices": cfg.simulation.wait_for_devices,
    }


def _check_homogeneous(cfg: HetkdConfig) -> None:
    archs = assign_architectures(
        cfg.models.assignment, cfg.models.architectures, cfg.simulation.num_devices, cfg.models.tiers
    )
    if len(set(archs)) > 1:
        raise ConfigError(
            "models.assignment",
            f"strategy 'fedavg' averages weights and needs one architecture on every device, but "
            f"assignment={cfg.models.assignment!r} gives {sorted(set(archs))}; set "
            "models.assignment=homogeneous (or models.architectures=[<one name>])",
        )


@dataclass(frozen=True)
class StrategySpec:
    """How to build one named strategy from a config."""

    build: Callable[[HetkdConfig, Federation, str], DeviceStrategy]
    description: str
    check: Callable[[HetkdConfig], None] | None = None
    #: the server holds a global model of the (single) architecture (FedAvg)
    global_model: bool = False


STRATEGIES: dict[str, StrategySpec] = {
    "local": StrategySpec(
        lambda cfg, fed, text: LocalOnly(**_common(cfg, text)),  # type: ignore[arg-type]
        "devices train alone (lower bound)",
    ),
    "fedavg": StrategySpec(
        lambda cfg, fed, text: FedAvg(**_common(cfg, text)),
        "weight averaging, homogeneous models only (reference point)",
        _check_homogeneous,
        global_model=True,
    ),
}


def check_strategy(cfg: HetkdConfig) -> None:
    """Reject an unknown ``strategy.name`` or a config the strategy cannot run."""
    name = cfg.strategy.name
    if name not in STRATEGIES:
        close = difflib.get_close_matches(name, list(STRATEGIES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            "strategy.name", f"unknown strategy {name!r}{hint}; valid choices: {', '.join(STRATEGIES)}"
        )
    spec = STRATEGIES[name]
    if spec.check is not None:
        spec.check(cfg)


def build_strategy(cfg: HetkdConfig, federation: Federation, device_config: str) -> DeviceStrategy:
    """The strategy ``cfg.strategy.name`` configured from ``cfg``."""
    check_strategy(cfg)
    return STRATEGIES[cfg.strategy.name].build(cfg, federation, device_config)


def initial_arrays(cfg: HetkdConfig, federation: Federation) -> ArrayRecord:
    """Initial global weights for weight-averaging strategies; empty otherwise."""
    if not STRATEGIES[cfg.strategy.name].global_model:
        return ArrayRecord()
    arch = assign_architectures(cfg.models.assignment, cfg.models.architectures, 1, cfg.models.tiers)[0]
    with seeded(cfg.seed, "global-init"):
        model = build_model(arch, federation.input_shape, federation.num_classes)
    return ArrayRecord(model.state_dict())
